"""The one training loop: the score model (`run_lib.training`) and the noise-conditional
classifier (`run_lib.classifier`) each run it as a `Task`.

The loop owns what every model's training shares: Ctrl-C at a safe point (`run_lib.interrupt`),
steps/s and ETA lines, the non-finite loss guard (naming the last verified checkpoint),
TensorBoard scalars, the periodic checkpoints (`run_lib.checkpoints`: manifests, verified
restore of the newest good one) and resume. A task brings its batch of a step, its periodic
evaluation and what it saves besides its checkpoint. The state is `models.utils.State` for
every task (step, params, opt_state, params_ema, model_state, rng).

Schedule, in steps (multiples of the task's steps per call): every log_freq and at the end a log
line and scalars; every eval_freq (and at the end where the task asks) its evaluation; at every
multiple of one of save_freqs and at the end a checkpoint, then the task's extra saves.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np
import tensorflow as tf
from absl import logging

from run_lib import checkpoints, logs, runtime
from run_lib.interrupt import Interrupted, interrupted


class Schedule(NamedTuple):
    """When the loop does what, in steps (see the module docstring)."""

    total: int
    per_call: int  # steps per call of the train step
    batch_size: int  # for img/s
    log_freq: int
    eval_freq: int
    save_freqs: tuple
    eval_at_end: bool = False


def snapshot_index(step: int, freq: int) -> int:
    """k of checkpoint_<k> for a snapshot at `step`: step / freq, or the next k for a final
    step that is not a multiple, so that it never collides with an earlier snapshot."""
    return math.ceil(step / freq)


class Task:
    """A model's part of the loop. Subclasses set the attributes and override the hooks."""

    name = ""  # the prefix of its log lines ("classifier step 4/6")
    title = ""  # who is resumed ("Resumed the classifier from ...")
    loss_name = "training loss"  # in the non-finite error
    loss_hint = ""  # what to change after a non-finite loss, appended to that error
    scalar_names: dict = {}  # TensorBoard names of the step's metrics, where not their own
    phase = "meta"  # the fault-injection phase of its checkpoint (run_lib.faults)
    # Set by the subclass: the Orbax manager of its resumable checkpoints, the TensorBoard
    # writer (None off the chief); with snapshots, their manager and frequency.
    manager = writer = snapshots = None
    snapshot_freq = 1
    # The newest checkpoint known to be good: restored after verification, or saved by this
    # run (None before either). Errors name it, never merely the newest folder on disk.
    good_step: int | None = None

    def batch(self, step: int):
        """The (global, sharded) batch of the call that starts at `step`."""
        raise NotImplementedError

    def evaluate(self, state, step: int) -> dict:
        """Runs the periodic evaluation, logs it; returns its TensorBoard scalars."""
        return {}

    def pre_save(self, step: int, state) -> int | None:
        """Saved before the checkpoint of `step`; returns its size in bytes (or None)."""
        return None

    def post_save(self, step: int, state, at_end: bool) -> None:
        """Saved after the checkpoint of `step`; also called on resume, to write what a kill
        prevented (so it must skip what exists)."""

    def resumed(self, step: int | None) -> None:
        """Called once the newest good checkpoint (step) or none (None) is known."""

    def newest_good(self) -> str:
        if self.good_step is None:
            return "no checkpoint has been written or verified yet"
        return f"the last good state is step {self.good_step} in {self.manager.directory}"

    def log_scalars(self, scalars: dict, step: int) -> None:
        if self.writer is not None and scalars:
            with self.writer.as_default():
                for name, value in scalars.items():
                    tf.summary.scalar(self.scalar_names.get(name, name), value, step=step)

    def checkpoint(self, step: int, state) -> None:
        """The resumable checkpoint of `step` (with the task's pre- and post-save files)."""
        data_bytes = self.pre_save(step, state)
        if step in self.manager.all_steps():  # a damaged or incomplete one this run fell back from
            self.manager.delete(step)
        checkpoints.save(self.manager, step, state, self.phase, step, data_bytes)
        self.good_step = step

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
        k = snapshot_index(step, self.snapshot_freq)
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

    def save_snapshot(self, step: int, state) -> None:
        """The snapshot checkpoint_<k> of `step`, unless it is written."""
        k, done = self._snapshot_slot(step)
        if not done:
            checkpoints.save(self.snapshots, k, state, "snapshot", step)


def _prefix(task: Task, step: int) -> str:
    return f"{task.name} step {step}" if task.name else f"step {step}"


def resume(task: Task, abstract, init):
    """The state of the newest good checkpoint of task.manager, else `init()`."""
    state, step = checkpoints.restore_newest_good(task.manager, abstract)
    task.good_step = step
    task.resumed(step)
    if state is None:
        return init()
    logging.info("Resumed %sfrom %s at step %d.", f"{task.title} " if task.title else "",
                 checkpoints.step_dir(task.manager, step), step)
    return state


def checked_losses(losses, step: int, task: Task) -> np.ndarray:
    """The losses on the host; a NaN in the parameters shows here, before any save."""
    losses = np.asarray(jax.device_get(losses))
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(
            f"Non-finite {task.loss_name} {losses} at step {step}; stopping before any "
            f"checkpoint is written; {task.newest_good()}.{task.loss_hint}")
    return losses


def run(task: Task, state, train_step, schedule: Schedule, compile_what: str):
    """Trains `state` with train_step(state, batch) -> (state, metrics) to schedule.total.

    `metrics`: the losses of the call ([per_call]), or a dict of metrics with a "loss" key
    (logged first).
    """
    sc, step = schedule, int(state.step)
    if step > 0:
        task.post_save(step, state, step >= sc.total)  # what a kill during a save left out
    if step >= sc.total:
        logging.info("Already trained to %s >= n_iters=%d; nothing to do.", _prefix(task, step),
                     sc.total)
    throughput, first_step = logs.Throughput(step, sc.total), step
    while step < sc.total:
        if interrupted():
            raise Interrupted(f"Interrupted at {_prefix(task, step)}; {task.newest_good()}. Run "
                              "the same command again to resume.")
        batch = task.batch(step)
        if step == first_step:
            # Compiled before its first call, so that the compiler's freed working memory goes
            # back to the OS before the step allocates its buffers (peak RSS of the CIFAR-10
            # NCSN++ train process at batch 8: 3.70 -> 3.28 GB).
            with logs.compiling(compile_what):
                train_step = train_step.lower(state, batch).compile()
            runtime.release_host_memory()
        state, metrics = train_step(state, batch)
        step += sc.per_call
        at_end = step >= sc.total
        save = at_end or any(step % f == 0 for f in sc.save_freqs)
        log = step % sc.log_freq == 0 or at_end
        if not isinstance(metrics, dict):
            metrics = {"loss": metrics}
        if log or save:
            metrics = dict(metrics, loss=checked_losses(metrics["loss"], step, task))
        if log:
            rate, eta = throughput(step)
            # Means over the jitted steps, as the reference logs the loss; the loss first (a
            # jitted step returns its dict with sorted keys).
            means = {k: float(np.mean(metrics[k]))
                     for k in ["loss", *sorted(set(metrics) - {"loss"})]}
            logging.info("%s/%d  %s  %.2f steps/s  %.1f img/s  ETA %s", _prefix(task, step),
                         sc.total, "  ".join(f"{k} {v:.5f}" for k, v in means.items()), rate,
                         rate * sc.batch_size, logs.fmt_eta(eta))
            task.log_scalars({**means, "steps_per_second": rate}, step)
        if step % sc.eval_freq == 0 or (at_end and sc.eval_at_end):
            task.log_scalars(task.evaluate(state, step), step)
        if save:
            task.checkpoint(step, state)
            task.post_save(step, state, at_end)
    if step > first_step:
        logging.info("Training finished at %s.", _prefix(task, step))
    if task.writer is not None:
        task.writer.flush()
    return state
