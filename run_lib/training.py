"""The training loop: sharded steps, checkpoints that survive kills, logs, snapshot samples.

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

import dataclasses
import math
import os
import time

import jax
import numpy as np
import tensorflow as tf
from absl import logging

import datasets
import losses
from evaluation import images_to_uint8
from models import utils as mutils
from run_lib import checkpoints, faults, files, logs, runtime
from run_lib.checks import prepare
from run_lib.devices import batch_sharded, gather, make_mesh, replicated, to_global
from run_lib.interrupt import Interrupted, interrupted
from run_lib.steps import build, build_step_fns, get_sample_fn, stream


def snapshot_index(step: int, freq: int) -> int:
    """k of checkpoint_<k> for a snapshot at `step`: step / freq, or the next k for a final
    step that is not a multiple, so that it never collides with an earlier snapshot."""
    return math.ceil(step / freq)


@dataclasses.dataclass
class _Run:
    """What the loop needs besides the state; built once by `train`."""

    config: object
    workdir: str
    snapshots: object
    meta: object
    train_iter: object
    sample_fn: object
    writer: object
    # The newest meta checkpoint known to be good: restored after verification, or saved by
    # this run (None before either). Errors name it, never merely the newest folder on disk.
    good_step: int | None = None
    data_bytes: int | None = None  # the size of the newest input-pipeline state

    def log_scalar(self, name, value, step):
        if self.writer is not None:
            with self.writer.as_default():
                tf.summary.scalar(name, value, step=step)

    def save_meta(self, step, state):
        # Pipeline state first: a meta checkpoint is only ever paired with its own data.
        self.data_bytes = checkpoints.save_data_state(
            self.workdir, step, self.train_iter, checkpoints.state_bytes(state), self.data_bytes)
        if step in self.meta.all_steps():  # a damaged or incomplete one this run fell back from
            self.meta.delete(step)
        checkpoints.save(self.meta, step, state, "meta", step, self.data_bytes)
        self.good_step = step
        checkpoints.clean_data_states(self.workdir, self.meta.all_steps())

    def newest_good(self) -> str:
        if self.good_step is None:
            return "no checkpoint has been written or verified yet"
        return f"the last good state is step {self.good_step} in {self.meta.directory}"

    def _held_step(self, k) -> int | None:
        """The step checkpoint_<k> holds (None: no manifest; -1: an unreadable manifest)."""
        try:
            manifest = checkpoints.read_manifest(checkpoints.step_dir(self.snapshots, k))
        except checkpoints.DamagedCheckpointError:
            return -1
        return None if manifest is None else manifest["train_step"]

    def _snapshot_slot(self, step) -> tuple[int, bool]:
        """(k, done): the checkpoint_<k> for the state of `step`, and whether it is written.

        k = snapshot_index(step). Snapshots are never overwritten: if checkpoint_<k> holds
        another step (the final step of an earlier, shorter run), the state goes to the next
        free number (the same one again after a kill). A folder without its manifest is a save
        that a kill interrupted: it is written again."""
        steps = sorted(self.snapshots.all_steps())
        k = snapshot_index(step, self.config.training.snapshot_freq)
        held = {j: self._held_step(j) for j in steps if j >= k}
        done = [j for j, s in held.items() if s == step]
        if done:
            return done[0], True
        if held.get(k) is not None:
            new = steps[-1] + (held[steps[-1]] is not None)
            what = (f"holds step {held[k]} (the end of an earlier run)" if held[k] >= 0
                    else "has a damaged manifest")
            logging.info("checkpoint_%d %s and is kept; step %d is saved as checkpoint_%d.", k,
                         what, step, new)
            k = new
        if k in steps:
            logging.warning("%s has no %s (a save that a kill interrupted); writing it again.",
                            checkpoints.step_dir(self.snapshots, k), checkpoints.MANIFEST)
            self.snapshots.delete(k)
        return k, False

    def save_snapshot(self, step, state):
        """checkpoint_<k> and the sample grid of `step`, each unless it already exists."""
        k, done = self._snapshot_slot(step)
        if not done:
            checkpoints.save(self.snapshots, k, state, "snapshot", step)
        grid = os.path.join(self.workdir, "samples", f"iter_{step}", "sample.png")
        if self.sample_fn is not None and not os.path.exists(grid):
            faults.point("samples.before", step)
            snapshot_samples(self.sample_fn, state, step, self.workdir)


def train(config, workdir: str, eval_folder: str = "eval") -> None:
    """Trains the configured score model, resuming from workdir/checkpoints-meta if present."""
    config = prepare(config, "train", workdir)
    files.check_workdir(workdir)
    mesh = make_mesh()
    sde, model = build(config)
    # The data first: a data error stops the run before anything is written in the workdir.
    train_ds, eval_ds, source = datasets.get_dataset(
        config, uniform_dequantization=config.data.uniform_dequantization)
    train_iter, eval_iter = iter(train_ds), iter(eval_ds)
    if getattr(source, "seekable", False):  # its state is a batch count, not buffered images
        train_iter = checkpoints.PositionIterator(
            lambda start: datasets.get_dataset(
                config, uniform_dequantization=config.data.uniform_dequantization,
                start_batch=start)[0], first=train_ds)
    snapshots, meta = checkpoints.managers(workdir, config)
    state, good_step = _initial_state(config, workdir, meta, train_iter, replicated(mesh))
    runtime.release_host_memory()  # what initialization and restoring freed
    # Only now, with the checkpoint known to match, does the run record its config.
    files.save_config(config, workdir)
    logs.log_to_file(workdir)
    logging.info("Model %s: %s parameters.", config.model.name,
                 f"{mutils.count_params(state.params):,}")
    tc = config.training
    sample_fn = None
    if tc.snapshot_sampling:
        shape = (tc.batch_size, config.data.image_size, config.data.image_size,
                 config.data.num_channels)
        sample_fn = get_sample_fn(config, sde, model, shape, mesh)
    writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard")) \
        if files.is_chief() else None
    run = _Run(config, workdir, snapshots, meta, train_iter, sample_fn, writer, good_step)
    step = int(state.step)
    if step > 0 and (step % tc.snapshot_freq == 0 or step >= tc.n_iters):
        run.save_snapshot(step, state)  # what a kill during the last save left unwritten
    if step >= tc.n_iters:
        logging.info("Already trained to step %d >= n_iters=%d; nothing to do.", step,
                     tc.n_iters)
    else:
        train_step, eval_losses = build_step_fns(config, sde, model,
                                                 losses.get_optimizer(config), mesh)
        _loop(run, state, train_step, eval_losses, eval_iter, batch_sharded(mesh, 1))
    if writer is not None:
        writer.flush()


def _loop(run, state, train_step, eval_losses, eval_iter, stacked):
    tc = run.config.training
    scaler = datasets.get_data_scaler(run.config)

    def next_batch(iterator):
        return to_global(scaler(iterator.get_next()["image"].numpy()), stacked)

    step, total = int(state.step), tc.n_iters
    first_step = step
    throughput = logs.Throughput(step, total)
    while step < total:
        if interrupted():
            raise Interrupted(f"Interrupted at step {step}; {run.newest_good()}. Run the same "
                              "command again to resume.")
        batch = next_batch(run.train_iter)
        if step == first_step:
            # Compiled before its first call, so that the compiler's freed working memory goes
            # back to the OS before the step allocates its buffers (peak RSS of the CIFAR-10
            # NCSN++ train process at batch 8: 3.70 -> 3.28 GB).
            with logs.compiling(f"the train step ({tc.n_jitted_steps} step(s) of batch "
                                f"{tc.batch_size} per call)"):
                train_step = train_step.lower(state, batch).compile()
            runtime.release_host_memory()
        state, step_losses = train_step(state, batch)
        step += tc.n_jitted_steps
        at_end = step >= total
        snapshot = step % tc.snapshot_freq == 0 or at_end
        save = snapshot or step % tc.snapshot_freq_for_preemption == 0
        log = step % tc.log_freq == 0 or at_end
        if log or save:
            step_losses = _checked_losses(step_losses, step, run)
        if log:
            rate, eta = throughput(step)
            # The mean over the jitted steps, as the reference logs it.
            loss = float(np.mean(step_losses))
            logging.info("step %d/%d  loss %.5f  %.2f steps/s  %.1f img/s  ETA %s", step, total,
                         loss, rate, rate * tc.batch_size, logs.fmt_eta(eta))
            run.log_scalar("training_loss", loss, step)
            run.log_scalar("steps_per_second", rate, step)
        if step % tc.eval_freq == 0:
            eval_loss = float(np.mean(eval_losses(state, next_batch(eval_iter), 0)))
            logging.info("step %d  eval_loss %.5f", step, eval_loss)
            run.log_scalar("eval_loss", eval_loss, step)
        if save:
            run.save_meta(step, state)
        if snapshot:
            run.save_snapshot(step, state)
    logging.info("Training finished at step %d.", step)


def _initial_state(config, workdir, meta, train_iter, sharding):
    """(state, step): the newest good meta checkpoint (with its pipeline position) and its
    step, else a new state and None."""
    rng = jax.random.PRNGKey(config.seed)
    abstract = checkpoints.abstract_state(config, rng, sharding)
    state, step = checkpoints.restore_newest_good(meta, abstract)
    checkpoints.clean_data_states(workdir, meta.all_steps())
    if state is None:
        return checkpoints.init_state(config, rng, sharding), None
    if not checkpoints.restore_data_state(workdir, step, train_iter):
        logging.warning("No input-pipeline state for step %d: the data order restarts.", step)
    logging.info("Resumed from %s at step %d.", checkpoints.step_dir(meta, step), step)
    return state, step


def _checked_losses(step_losses, step, run) -> np.ndarray:
    """The losses on the host; a NaN in the parameters shows here, before any save."""
    step_losses = np.asarray(jax.device_get(step_losses))
    if not np.all(np.isfinite(step_losses)):
        raise FloatingPointError(
            f"Non-finite training loss {step_losses} at step {step}; stopping before any "
            f"checkpoint is written; {run.newest_good()}.")
    return step_losses


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
