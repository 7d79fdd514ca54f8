"""--mode=train: the score model as a task of the one training loop (`run_lib.loop`).

Schedule (all steps are multiples of training.n_jitted_steps):
- every log_freq steps: loss, steps/s, ETA in the log and TensorBoard;
- every eval_freq steps: the loss on one evaluation batch;
- every snapshot_freq_for_preemption steps: the pipeline position, then a meta checkpoint;
- every snapshot_freq steps and at the final step: a snapshot checkpoint_<k>,
  k = ceil(step / snapshot_freq), and a sample grid samples/iter_<step>. Snapshots are never
  overwritten: where checkpoint_<k> holds another step (the final step of an earlier, shorter
  run), the state goes to the next free number, and the log says so.
A restarted run resumes from the newest good meta checkpoint and first writes any snapshot or
sample grid of that step that a kill prevented, so every scheduled file exists in the end.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
import tensorflow as tf
from absl import logging

from evaluation import images_to_uint8
from models import utils as mutils
from run_lib import checkpoints, faults, files, logs, loop, runtime
from run_lib.build import build, build_step_fns, dataset, get_sample_fn, optimizer, scalers
from run_lib.checks import prepare
from run_lib.devices import batch_sharded, gather, make_mesh, replicated, to_global
from run_lib.loop import checked_losses as _checked_losses  # noqa: F401 (the former name)
from run_lib.loop import snapshot_index  # noqa: F401 (the former home)
from run_lib.steps import stream


class _Run(loop.Task):
    """The score model's task: meta checkpoints with the input-pipeline state, snapshots and
    their sample grids, the loss on an evaluation batch."""

    scalar_names = {"loss": "training_loss"}

    def __init__(self, config, workdir, snapshots, meta, train_iter, sample_fn, writer,
                 good_step=None):
        self.config, self.workdir, self.snapshots, self.meta = config, workdir, snapshots, meta
        self.train_iter, self.sample_fn, self.writer = train_iter, sample_fn, writer
        self.good_step, self.data_bytes = good_step, None  # the newest pipeline state's size

    @property
    def manager(self):
        return self.meta

    @property
    def snapshot_freq(self):
        return self.config.training.snapshot_freq

    def _next(self, iterator):
        return to_global(self.scaler(iterator.get_next()["image"].numpy()), self.stacked)

    def batch(self, step):
        return self._next(self.train_iter)

    def evaluate(self, state, step):
        eval_loss = float(np.mean(self.eval_losses(state, self._next(self.eval_iter), 0)))
        logging.info("step %d  eval_loss %.5f", step, eval_loss)
        return {"eval_loss": eval_loss}

    def pre_save(self, step, state):
        # Pipeline state first: a meta checkpoint is only ever paired with its own data.
        self.data_bytes = checkpoints.save_data_state(
            self.workdir, step, self.train_iter, checkpoints.state_bytes(state), self.data_bytes)
        return self.data_bytes

    def post_save(self, step, state, at_end):
        checkpoints.clean_data_states(self.workdir, self.meta.all_steps())
        if step % self.snapshot_freq == 0 or at_end:
            self.save_snapshot(step, state)

    def resumed(self, step):
        checkpoints.clean_data_states(self.workdir, self.meta.all_steps())
        if step is not None and not checkpoints.restore_data_state(self.workdir, step,
                                                                    self.train_iter):
            logging.warning("No input-pipeline state for step %d: the data order restarts.", step)

    def save_snapshot(self, step, state):
        """checkpoint_<k> and the sample grid of `step`, each unless it already exists."""
        super().save_snapshot(step, state)
        grid = os.path.join(self.workdir, "samples", f"iter_{step}", "sample.png")
        if self.sample_fn is not None and not os.path.exists(grid):
            faults.point("samples.before", step)
            snapshot_samples(self.sample_fn, state, step, self.workdir)


def train(config, workdir: str, eval_folder: str = "eval") -> None:
    """Trains the configured score model, resuming from workdir/checkpoints-meta if present."""
    del eval_folder  # the uniform signature of the modes
    config = prepare(config, "train", workdir)
    files.check_workdir(workdir)
    mesh, tc = make_mesh(), config.training
    sde, model = build(config)
    # The data first: a data error stops the run before anything is written in the workdir.
    train_ds, eval_ds, source = dataset(
        config, uniform_dequantization=config.data.uniform_dequantization)
    train_iter = iter(train_ds)
    if getattr(source, "seekable", False):  # its state is a batch count, not buffered images
        train_iter = checkpoints.PositionIterator(
            lambda start: dataset(
                config, uniform_dequantization=config.data.uniform_dequantization,
                start_batch=start)[0], first=train_ds)
    run = _Run(config, workdir, *checkpoints.managers(workdir, config), train_iter, None, None)
    rng, rep = jax.random.PRNGKey(config.seed), replicated(mesh)
    state = loop.resume(run, checkpoints.abstract_state(config, rng, rep),
                        lambda: checkpoints.init_state(config, rng, rep))
    runtime.release_host_memory()  # what initialization and restoring freed
    # Only now, with the checkpoint known to match, does the run record its config.
    files.save_config(config, workdir)
    logs.log_to_file(workdir)
    logging.info("Model %s: %s parameters.", config.model.name,
                 f"{mutils.count_params(state.params):,}")
    if tc.snapshot_sampling:
        shape = (tc.batch_size, config.data.image_size, config.data.image_size,
                 config.data.num_channels)
        run.sample_fn = get_sample_fn(config, sde, model, shape, mesh)
    if files.is_chief():
        run.writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    train_step, run.eval_losses = build_step_fns(config, sde, model, optimizer(config), mesh)
    run.eval_iter, run.stacked = iter(eval_ds), batch_sharded(mesh, 1)
    run.scaler = scalers(config)[0]
    schedule = loop.Schedule(tc.n_iters, tc.n_jitted_steps, tc.batch_size, tc.log_freq,
                             tc.eval_freq, (tc.snapshot_freq, tc.snapshot_freq_for_preemption))
    loop.run(run, state, train_step, schedule,
             f"the train step ({tc.n_jitted_steps} step(s) of batch {tc.batch_size} per call)")


def snapshot_samples(sample_fn, state, step, workdir):
    """Samples from the EMA parameters at a snapshot: samples/iter_<step>/sample.{npz,png}."""
    rng = jax.random.fold_in(stream(state.rng, "snapshot_samples"), step)
    t0 = time.time()
    samples, nfe = sample_fn(rng, state.params_ema, state.model_state)
    samples = files.checked_images(gather(samples), f"samples at step {step}")
    samples = images_to_uint8(samples)
    logging.info("step %d: %d samples, %d NFE, %.1fs", step, len(samples), int(nfe),
                 time.time() - t0)
    if files.is_chief():
        folder = os.path.join(workdir, "samples", f"iter_{step}")
        files.save_samples(folder, samples, step=step)
        logging.info("Wrote %s.", os.path.join(folder, "sample.png"))
