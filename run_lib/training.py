"""The training loop: sharded steps, checkpoints, logs, snapshot samples."""

from __future__ import annotations

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
from run_lib import checkpoints, files, logs
from run_lib.checks import validate_config
from run_lib.devices import batch_sharded, gather, make_mesh, replicated, to_global
from run_lib.steps import build, build_step_fns, get_sample_fn, stream


def train(config, workdir: str) -> None:
    """Trains the configured score model, resuming from workdir/checkpoints-meta if present."""
    validate_config(config, "train")
    files.save_config(config, workdir)
    logs.log_to_file(workdir)
    mesh = make_mesh()
    sde, model = build(config)
    optimizer = losses.get_optimizer(config)
    snapshots, meta = checkpoints.managers(workdir, config)
    train_ds, eval_ds, _ = datasets.get_dataset(
        config, uniform_dequantization=config.data.uniform_dequantization)
    train_iter, eval_iter = iter(train_ds), iter(eval_ds)
    state = _initial_state(config, workdir, meta, train_iter, replicated(mesh))
    logging.info("Model %s: %s parameters.", config.model.name,
                 f"{mutils.count_params(state.params):,}")
    train_step, eval_losses = build_step_fns(config, sde, model, optimizer, mesh)
    tc = config.training
    sample_fn = None
    if tc.snapshot_sampling:
        shape = (tc.batch_size, config.data.image_size, config.data.image_size,
                 config.data.num_channels)
        sample_fn = get_sample_fn(config, sde, model, shape, mesh)
    writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard")) \
        if files.is_chief() else None
    scaler = datasets.get_data_scaler(config)
    stacked = batch_sharded(mesh, leading_axes=1)

    def next_batch(iterator):
        return to_global(scaler(iterator.get_next()["image"].numpy()), stacked)

    def log_scalar(name, value, step):
        if writer is not None:
            with writer.as_default():
                tf.summary.scalar(name, value, step=step)

    step, total = int(state.step), tc.n_iters
    if step >= total:
        logging.info("Already trained to step %d >= n_iters=%d; nothing to do.", step, total)
    throughput = logs.Throughput(step, total)
    while step < total:
        state, step_losses = train_step(state, next_batch(train_iter))
        step += tc.n_jitted_steps
        at_end = step >= total
        snapshot = step % tc.snapshot_freq == 0 or at_end
        save = snapshot or step % tc.snapshot_freq_for_preemption == 0
        log = step % tc.log_freq == 0 or at_end
        if log or save:
            step_losses = _checked_losses(step_losses, step, meta)
        if log:
            rate, eta = throughput(step)
            # The mean over the jitted steps, as the reference logs it.
            loss = float(np.mean(step_losses))
            logging.info("step %d/%d  loss %.5f  %.2f steps/s  %.1f img/s  ETA %s", step, total,
                         loss, rate, rate * tc.batch_size, logs.fmt_eta(eta))
            log_scalar("training_loss", loss, step)
            log_scalar("steps_per_second", rate, step)
        if step % tc.eval_freq == 0:
            eval_loss = float(np.mean(eval_losses(state, next_batch(eval_iter), 0)))
            logging.info("step %d  eval_loss %.5f", step, eval_loss)
            log_scalar("eval_loss", eval_loss, step)
        if save:
            # Pipeline state first: a meta checkpoint is only ever paired with its own data.
            checkpoints.save_data_state(workdir, step, train_iter)
            checkpoints.save(meta, step, state)
        if snapshot:
            checkpoints.save(snapshots, step // tc.snapshot_freq, state)
            if sample_fn is not None:
                snapshot_samples(sample_fn, state, step, workdir)
    if writer is not None:
        writer.flush()
    logging.info("Training finished at step %d.", step)


def _initial_state(config, workdir, meta, train_iter, sharding):
    """The state to start from: the newest meta checkpoint (with its data position), else new."""
    rng = jax.random.PRNGKey(config.seed)
    latest = meta.latest_step()
    if latest is None:
        return checkpoints.init_state(config, rng, sharding)
    state = checkpoints.restore(meta, latest, checkpoints.abstract_state(config, rng, sharding))
    if not checkpoints.restore_data_state(workdir, latest, train_iter):
        logging.warning("No input-pipeline state for step %d: the data order restarts.", latest)
    logging.info("Resumed from %s at step %d.", meta.directory, latest)
    return state


def _checked_losses(step_losses, step, meta) -> np.ndarray:
    """The losses on the host; a NaN in the parameters shows here, before any save."""
    step_losses = np.asarray(jax.device_get(step_losses))
    if not np.all(np.isfinite(step_losses)):
        raise FloatingPointError(
            f"Non-finite training loss {step_losses} at step {step}; stopping before any "
            f"checkpoint is written. The last good state is in {meta.directory} (step "
            f"{meta.latest_step()}).")
    return step_losses


def snapshot_samples(sample_fn, state, step, workdir):
    """Samples from the EMA parameters at a snapshot: samples/iter_<step>/sample.{npz,png}."""
    rng = jax.random.fold_in(stream(state.rng, "snapshot_samples"), step)
    t0 = time.time()
    samples, nfe = sample_fn(rng, state.params_ema, state.model_state)
    samples = images_to_uint8(gather(samples))
    logging.info("step %d: %d samples, %d NFE, %.1fs", step, len(samples), int(nfe),
                 time.time() - t0)
    if files.is_chief():
        files.save_samples(os.path.join(workdir, "samples", f"iter_{step}"), samples)
