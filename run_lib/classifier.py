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
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorflow as tf
from absl import logging

import controllable_generation as cg
import datasets
import losses
from models import utils as mutils
from run_lib import checkpoints, files, logs
from run_lib.checks import ConfigError, UsageError, prepare
from run_lib.devices import batch_sharded, compile_once, make_mesh, replicated, to_global
from run_lib.interrupt import Interrupted, interrupted
from run_lib.steps import build

# Input normalisations by config.classifier.input_normalization: (mean, std) per channel.
NORMALIZATIONS = {"none": (None, None), "cifar10": (cg.CIFAR10_MEAN, cg.CIFAR10_STD)}
# The smallest t the classifier is trained and evaluated at (the training objective's eps).
T_EPS = 1e-5


@flax.struct.dataclass
class ClassifierState:
    step: Any
    params: Any
    opt_state: Any
    rng: Any


def classifier_dir(workdir: str) -> str:
    return os.path.join(workdir, "classifier")


def get_optimizer(config) -> optax.GradientTransformation:
    """The score model's optimizer (`losses.adam`) with config.classifier's settings."""
    c = config.classifier
    return losses.adam(c.lr, warmup=c.warmup, grad_clip=c.grad_clip,
                       weight_decay=float(c.weight_decay))


def logit_fn(config, classifier, params):
    """logits(x [B, H, W, C] in model space, noise_scale [B]) -> [B, num_classes]."""
    mean, std = NORMALIZATIONS[config.classifier.input_normalization]
    return cg.get_logit_fn(classifier, params, mean, std)


def _image_shape(config) -> tuple[int, int, int]:
    return (config.data.image_size, config.data.image_size, config.data.num_channels)


def _init_fn(config):
    classifier = mutils.create_classifier_module(config)
    optimizer = get_optimizer(config)

    def init(rng):
        params_rng, state_rng = jax.random.split(rng)
        params = mutils.init_classifier_params(classifier, params_rng, _image_shape(config))
        return ClassifierState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=optimizer.init(params), rng=state_rng)

    return init


def abstract_state(config, sharding):
    shapes = jax.eval_shape(_init_fn(config), jax.random.PRNGKey(config.seed))
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def perturb(sde, x, rng, t):
    """x(t) = mean(x, t) + std(t) z and std(t) [B]: what the classifier sees."""
    xt, _, std = sde.perturb(x, t, jax.random.normal(rng, x.shape, x.dtype))
    return xt, std


# ---------------------------------------------------------------------------- data


def _split_in_memory(config, dataset, what: str):
    """uint8 images [N, H, W, C] and int32 labels [N] of one evaluation-mode split (this host's
    shard)."""
    images, labels = [], []
    for batch in dataset:
        # The pipeline's floats are exactly k / 255.
        images.append(np.round(batch["image"].numpy() * 255.0).astype(np.uint8))
        labels.append(batch["label"].numpy().astype(np.int32))
    if not images:
        raise UsageError(f"The {what} split of {config.data.dataset} has fewer images than one "
                         f"batch (config.eval.batch_size={config.eval.batch_size}).")
    images, labels = np.concatenate(images), np.concatenate(labels)
    if np.any(labels == datasets.NO_LABEL):
        raise UsageError(f"config.data.dataset={config.data.dataset} has no class labels; a "
                         "classifier needs a labelled data set (CIFAR10, SVHN, MNIST, "
                         "FashionMNIST, or a 'folder' with one subfolder per class).")
    if labels.max() >= config.classifier.num_classes:
        raise ConfigError(f"config.classifier.num_classes={config.classifier.num_classes} but "
                          f"the {what} split has label {int(labels.max())}.")
    return images, labels


class _Batches:
    """The batch of a step: epoch e visits this host's examples in a permutation drawn from
    (seed, e, host), so any step's batch is known without replaying the run."""

    def __init__(self, images, labels, local_batch: int, seed: int):
        if len(images) < local_batch:
            raise ConfigError(f"config.classifier.batch_size is larger than the {len(images)} "
                              "training images this host holds.")
        self.images, self.labels, self.b, self.seed = images, labels, local_batch, seed
        self.per_epoch = len(images) // local_batch
        self._epoch, self._perm = None, None

    def __call__(self, step: int):
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng((self.seed, epoch, jax.process_index()))
            self._epoch, self._perm = epoch, rng.permutation(len(self.images))
        idx = self._perm[i * self.b:(i + 1) * self.b]
        return self.images[idx], self.labels[idx]


# ---------------------------------------------------------------------------- programs


def _programs(config, sde, mesh):
    """The jitted train step and eval step (correct predictions at one time t)."""
    classifier = mutils.create_classifier_module(config)
    optimizer = get_optimizer(config)
    scaler = datasets.get_data_scaler(config)
    flip = bool(config.data.random_flip)
    rep, batch = replicated(mesh), batch_sharded(mesh)

    def train_step(state, images, labels):
        x = scaler(images.astype(jnp.float32) / 255.0)
        flip_rng, t_rng, z_rng = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)
        if flip:
            flips = jax.random.bernoulli(flip_rng, 0.5, (x.shape[0], 1, 1, 1))
            x = jnp.where(flips, x[:, :, ::-1], x)
        t = jax.random.uniform(t_rng, (x.shape[0],), minval=T_EPS, maxval=sde.T)
        xt, std = perturb(sde, x, z_rng, t)

        def loss_fn(params):
            logits = logit_fn(config, classifier, params)(xt, std)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            return jnp.mean(loss), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, opt_state=opt_state,
                              params=optax.apply_updates(state.params, updates))
        return state, (loss, jnp.mean(jnp.argmax(logits, -1) == labels))

    def correct(params, images, labels, t, rng):
        x = scaler(images.astype(jnp.float32) / 255.0)
        t = jnp.full((x.shape[0],), jnp.maximum(t, T_EPS), x.dtype)
        xt, std = perturb(sde, x, rng, t)
        logits = logit_fn(config, classifier, params)(xt, std)
        return jnp.sum(jnp.argmax(logits, -1) == labels)

    train_step = jax.jit(train_step, in_shardings=(rep, batch, batch), out_shardings=(rep, rep),
                         donate_argnums=0)
    correct = jax.jit(correct, in_shardings=(rep, batch, batch, rep, rep), out_shardings=rep)
    return train_step, correct


# ---------------------------------------------------------------------------- the mode


def train_classifier(config, workdir: str, eval_folder: str = "eval") -> None:
    """Trains config.classifier on data perturbed by config's SDE; resumes from the newest
    checkpoint in <workdir>/classifier/checkpoints."""
    del eval_folder
    config = prepare(config, "train_classifier", workdir)
    files.check_workdir(workdir)
    folder = classifier_dir(workdir)
    mesh = make_mesh()
    sde, _ = build(config)
    c = config.classifier
    manager, _ = checkpoints.managers(folder, config)
    abstract = abstract_state(config, replicated(mesh))
    # Incomplete (a kill between Orbax's rename and the manifest) or damaged: an older one.
    state, step = checkpoints.restore_newest_good(manager, abstract)
    if step is not None:
        logging.info("Resumed the classifier from %s at step %d.",
                     checkpoints.step_dir(manager, step), step)
    else:
        state = compile_once(_init_fn(config), jax.random.PRNGKey(config.seed),
                             out_shardings=replicated(mesh))
    # The splits of the data set, one unshuffled pass each, held in memory.
    train_ds, test_ds, source = datasets.get_dataset(config, evaluation=True)
    names = datasets.class_names(source)
    if names and len(names) != c.num_classes:
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        raise ConfigError(f"config.classifier.num_classes={c.num_classes} but "
                          f"{config.data.dataset} has {len(names)} classes ({shown}); set "
                          f"--config.classifier.num_classes={len(names)} (here and for "
                          "--mode=conditional).")
    train = _split_in_memory(config, train_ds, "train")
    test = _split_in_memory(config, test_ds, "test")
    if len(test[0]) < c.batch_size // jax.process_count():
        raise ConfigError(f"config.classifier.batch_size={c.batch_size} is larger than the "
                          f"{len(test[0])} test images this host holds (evaluation batches).")
    files.save_config(config, folder)
    logs.log_to_file(folder)
    logging.info("Classifier WRN-%d-%d: %s parameters; %d training images on this host.",
                 6 * c.blocks_per_group + 4, c.channel_multiplier,
                 f"{mutils.count_params(state.params):,}", len(train[0]))
    local_batch = datasets.check_batch_size("classifier.batch_size", c.batch_size)
    batches = _Batches(*train, local_batch, config.seed)
    train_step, correct = _programs(config, sde, mesh)
    writer = tf.summary.create_file_writer(os.path.join(folder, "tensorboard")) \
        if files.is_chief() else None
    _loop(config, folder, manager, state, batches, test, train_step, correct, writer, mesh)


def _loop(config, folder, manager, state, batches, test, train_step, correct, writer, mesh):
    c = config.classifier
    sharding = batch_sharded(mesh)
    step = int(state.step)
    throughput = logs.Throughput(step, c.n_iters)
    if step >= c.n_iters:
        logging.info("The classifier is already trained to step %d >= classifier.n_iters=%d; "
                     "nothing to do.", step, c.n_iters)
    while step < c.n_iters:
        if interrupted():
            raise Interrupted(f"Interrupted at classifier step {step}; the newest checkpoint is "
                              f"step {max(manager.all_steps(), default=0)} in "
                              f"{manager.directory}. Run the same command again to resume.")
        images, labels = batches(step)
        state, (loss, acc) = train_step(state, to_global(images, sharding),
                                        to_global(labels, sharding))
        step += 1
        scalars = {}
        if step % c.log_freq == 0 or step == c.n_iters:
            loss, acc = float(loss), float(acc)
            if not np.isfinite(loss):
                raise FloatingPointError(f"Non-finite classifier loss {loss} at step {step}; "
                                         "lower config.classifier.lr.")
            rate, eta = throughput(step)
            logging.info("classifier step %d/%d  loss %.4f  accuracy %.3f  %.2f steps/s  ETA "
                         "%s", step, c.n_iters, loss, acc, rate, logs.fmt_eta(eta))
            scalars.update(loss=loss, accuracy=acc, steps_per_second=rate)
        if step % c.eval_freq == 0 or step == c.n_iters:
            accuracies = evaluate_accuracy(config, state.params, test, correct, sharding)
            logging.info("classifier step %d  test accuracy %s", step,
                         "  ".join(f"t={t}: {a:.3f}" for t, a in accuracies.items()))
            scalars.update({f"test_accuracy/t={t}": a for t, a in accuracies.items()})
            if files.is_chief():
                files.update_summary(folder, step, {f"t={t}": a for t, a in accuracies.items()})
        if writer is not None and scalars:
            with writer.as_default():
                for name, value in scalars.items():
                    tf.summary.scalar(name, value, step=step)
        if step % c.snapshot_freq == 0 or step == c.n_iters:
            if step in manager.all_steps():  # an incomplete one this run fell back from
                manager.delete(step)
            checkpoints.save(manager, step, state, "classifier", step)
    if writer is not None:
        writer.flush()


def evaluate_accuracy(config, params, test, correct, sharding) -> dict[float, float]:
    """Accuracy on the first classifier.eval_batches test batches at each eval time; the noise
    is drawn from fixed keys, so values from different steps compare like with like."""
    c = config.classifier
    images, labels = test
    local_batch = c.batch_size // jax.process_count()
    n_batches = max(min(int(c.eval_batches), images.shape[0] // local_batch), 1)
    key = jax.random.PRNGKey(config.seed + 1)
    out = {}
    for t in c.eval_times:
        hits = 0
        for i in range(n_batches):
            part = slice(i * local_batch, (i + 1) * local_batch)
            hits += int(correct(params, to_global(images[part], sharding),
                                to_global(labels[part], sharding), jnp.float32(t),
                                jax.random.fold_in(key, i)))
        out[float(t)] = hits / (n_batches * local_batch * jax.process_count())
    return out


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
                                             _image_shape(config))
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
