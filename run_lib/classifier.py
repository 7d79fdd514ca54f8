"""--mode=train_classifier: the noise-conditional classifier that class-conditional sampling
needs (Song et al. 2021, App. I.1; the reference ships a trained one but no training code).

The classifier p_t(y | x(t)) is a WideResnet (`models.wideresnet_noise_conditional`) that sees
x(t) = mean(x, t) + std(t) z, the data perturbed by the config's SDE at t ~ U(eps, T), and the
noise scale std(t), exactly what `controllable_generation.get_pc_conditional_sampler` gives it
while sampling. It is trained with cross-entropy on the labelled training split, held in memory
so that the batch of every step is a function of (seed, step) and a resumed run continues as an
uninterrupted one would.

Files, under <workdir>/classifier/:
  config.json                  the run's config (`models.utils.create_classifier` reads it)
  checkpoints/checkpoint_<s>   Orbax checkpoint at step s, every classifier.snapshot_freq steps
  summary.json                 test accuracy at each of classifier.eval_times, per eval step
  tensorboard/, stdout.txt     loss, accuracy, steps/s
"""

from __future__ import annotations

import os
import re

import jax
import tensorflow as tf
from absl import logging

import datasets
from models import utils as mutils
from run_lib import checkpoints, classifier_data, files, logs, loop
from run_lib import classifier_steps as cs
from run_lib.checks import prepare
from run_lib.classifier_steps import (  # noqa: F401 (re-exported)
    NORMALIZATIONS,
    T_EPS,
    abstract_state,
    get_optimizer,
    logit_fn,
    perturb,
)
from run_lib.devices import batch_sharded, compile_once, make_mesh, replicated, to_global
from run_lib.steps import build

# The train state of every model (run_lib.loop); the classifier keeps no EMA and no batch
# statistics: params_ema and model_state are empty.
ClassifierState = mutils.State


def classifier_dir(workdir: str) -> str:
    return os.path.join(workdir, "classifier")


class _Task(loop.Task):
    """The classifier's part of the loop: its batches, test accuracy and summary.json."""

    name, title, loss_name, phase = "classifier", "the classifier", "classifier loss", "classifier"
    loss_hint = " Lower config.classifier.lr."

    def __init__(self, config, folder, manager, mesh):
        self.config, self.folder, self.manager = config, folder, manager
        self.sharding = batch_sharded(mesh)

    def batch(self, step):
        return tuple(to_global(a, self.sharding) for a in self.batches(step))

    def evaluate(self, state, step):
        accuracies = cs.evaluate_accuracy(self.config, state.params, self.test, self.correct,
                                          self.sharding)
        logging.info("classifier step %d  test accuracy %s", step,
                     "  ".join(f"t={t}: {a:.3f}" for t, a in accuracies.items()))
        if files.is_chief():
            files.update_summary(self.folder, step, {f"t={t}": a for t, a in accuracies.items()})
        return {f"test_accuracy/t={t}": a for t, a in accuracies.items()}


def train_classifier(config, workdir: str, eval_folder: str = "eval") -> None:
    """Trains config.classifier on data perturbed by config's SDE; resumes from the newest
    checkpoint in <workdir>/classifier/checkpoints."""
    del eval_folder
    config = prepare(config, "train_classifier", workdir)
    files.check_workdir(workdir)
    folder, mesh, c = classifier_dir(workdir), make_mesh(), config.classifier
    sde, _ = build(config)
    task = _Task(config, folder, checkpoints.managers(folder, config)[0], mesh)
    # Incomplete (a kill between Orbax's rename and the manifest) or damaged: an older one.
    state = loop.resume(task, abstract_state(config, replicated(mesh)), lambda: compile_once(
        cs.init_fn(config), jax.random.PRNGKey(config.seed), out_shardings=replicated(mesh)))
    (images, labels), task.test = classifier_data.load_splits(config)
    files.save_config(config, folder)
    logs.log_to_file(folder)
    logging.info("Classifier WRN-%d-%d: %s parameters; %d training images on this host.",
                 6 * c.blocks_per_group + 4, c.channel_multiplier,
                 f"{mutils.count_params(state.params):,}", len(images))
    local_batch = datasets.check_batch_size("classifier.batch_size", c.batch_size)
    task.batches = classifier_data.Batches(images, labels, local_batch, config.seed)
    train_step, task.correct = cs.programs(config, sde, mesh)
    if files.is_chief():
        task.writer = tf.summary.create_file_writer(os.path.join(folder, "tensorboard"))
    schedule = loop.Schedule(c.n_iters, 1, c.batch_size, c.log_freq, c.eval_freq,
                             (c.snapshot_freq,), eval_at_end=True)
    loop.run(task, state, train_step, schedule, f"the classifier train step (batch "
             f"{c.batch_size})")


# ---------------------------------------------------------------------------- loading


_STEP_DIR = re.compile(r"^checkpoint_(\d+)$")


def load_classifier(config, workdir: str, mesh):
    """(classifier module, params, description) for --mode=conditional.

    config.classifier.path: '' = <workdir>/classifier; a classifier folder of this project or
    one of its checkpoint_<k> folders (restored with checksum and shape checks); or a flax
    msgpack file of parameters (the reference's). A checkpoint written for other sizes raises
    ConfigMismatchError naming the parameter.
    """
    path = config.classifier.path or classifier_dir(workdir)
    classifier = mutils.create_classifier_module(config)
    if os.path.isfile(path):
        init = mutils.init_classifier_params(classifier, jax.random.PRNGKey(0),
                                             cs.image_shape(config))
        try:
            params = mutils.load_classifier_params(path, init)
        except ValueError as e:
            raise checkpoints.ConfigMismatchError(str(e)) from None
        return classifier, jax.device_put(params, replicated(mesh)), path
    folder, step = path, None
    match = _STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    if match:
        folder, step = os.path.dirname(os.path.dirname(os.path.normpath(path))), \
            int(match.group(1))
    if not os.path.isdir(os.path.join(folder, "checkpoints")):
        raise FileNotFoundError(
            f"No classifier checkpoint at {path}: train one with --mode=train_classifier (same "
            "--config and --workdir), or set config.classifier.path to a classifier folder or "
            "a flax msgpack file.")
    manager, _ = checkpoints.managers(folder, config, create=False)
    steps = manager.all_steps()
    step = max(steps, default=None) if step is None else step
    if step is None or step not in steps:
        raise FileNotFoundError(f"No classifier checkpoint {'' if step is None else step} in "
                                f"{manager.directory} (existing: {sorted(steps)}).")
    try:
        state = checkpoints.restore(manager, step, abstract_state(config, replicated(mesh)))
    except checkpoints.ConfigMismatchError as e:
        detail = str(e).split(" Use the config")[0]
        raise checkpoints.ConfigMismatchError(
            f"{detail}: the classifier was trained with other config.classifier sizes "
            f"(blocks_per_group, channel_multiplier, num_classes; its config is "
            f"{os.path.join(folder, 'config.json')}).") from None
    return classifier, state.params, checkpoints.step_dir(manager, step)
