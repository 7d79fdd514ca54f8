"""The evaluation loop over checkpoints, and the dataset statistics FID compares against."""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import logging

import datasets
import evaluation
from run_lib import checkpoints, files, logs
from run_lib.build import build
from run_lib.checks import prepare
from run_lib.devices import make_mesh, replicated
from run_lib.evaluators import InceptionScorer, enabled_evaluators
from run_lib.interrupt import Interrupted, interrupted
from run_lib.steps import stream


def evaluate(config, workdir: str, eval_folder: str = "eval") -> None:
    """Evaluates checkpoints begin_ckpt..end_ckpt: loss, bits/dim and sample quality.

    Writes under workdir/<eval_folder>/: ckpt_<k>_loss.npz, ckpt_<k>_bpd.npz,
    ckpt_<k>/samples_<r>.npz and statistics_<r>.npz per sampling round, report_<k>.npz
    (IS, FID, KID) and summary.json. A killed evaluation resumes at its next unfinished
    sampling round and reproduces the uninterrupted result exactly.
    """
    config = prepare(config, "eval", workdir)
    files.check_workdir(workdir, must_exist=True)
    ec = config.eval
    mesh = make_mesh()
    sde, model = build(config)
    eval_dir = os.path.join(workdir, eval_folder)
    evaluators = enabled_evaluators(config, sde, model, mesh, eval_dir)
    rng = jax.random.PRNGKey(config.seed)
    abstract = checkpoints.abstract_state(config, rng, replicated(mesh))
    snapshots, _ = checkpoints.managers(workdir, config, create=False)
    for ckpt in range(ec.begin_ckpt, ec.end_ckpt + 1):
        _wait_for_checkpoint(snapshots, ckpt, config, workdir)
        state = checkpoints.restore(snapshots, ckpt, abstract)
        os.makedirs(eval_dir, exist_ok=True)
        results = {"step": int(state.step)}
        ckpt_key = jax.random.fold_in(rng, ckpt)
        for name, evaluator in evaluators.items():
            if interrupted():
                raise Interrupted(f"Interrupted at checkpoint {ckpt}; finished rounds are kept "
                                  "and a rerun resumes after them.")
            results.update(evaluator.run(state, ckpt, stream(ckpt_key, name)))
        if files.is_chief():
            files.update_summary(eval_dir, ckpt, results)
        logging.info("ckpt %d: %s", ckpt, results)


# A training run logs at least every few minutes; a workdir untouched for this long has none.
TRAINING_ALIVE_SECS = 3600
DEFAULT_WAIT_SECS = 86400


def _training_alive(workdir: str) -> bool:
    paths = [os.path.join(workdir, "stdout.txt"), os.path.join(workdir, "checkpoints-meta")]
    times = [os.path.getmtime(p) for p in paths if os.path.exists(p)]
    return bool(times) and time.time() - max(times) < TRAINING_ALIVE_SECS


def _steps_on_disk(manager):
    manager.reload()  # a training run may have written new ones meanwhile
    return manager.all_steps()


def _wait_for_checkpoint(manager, ckpt, config, workdir):
    """Waits for checkpoint `ckpt`: eval.ckpt_wait_secs if set (>= 0); by default 24 h, but
    only while a training run is writing to the workdir; otherwise fails at once."""
    limit = float(config.eval.ckpt_wait_secs)
    if limit < 0:
        limit = DEFAULT_WAIT_SECS if _training_alive(workdir) else 0.0
    waited, poll = 0.0, min(60.0, max(1.0, limit / 10))
    # A checkpoint is complete once its manifest is written (just after Orbax's rename).
    while not (ckpt in _steps_on_disk(manager)
               and checkpoints.has_manifest(checkpoints.step_dir(manager, ckpt))):
        if waited >= limit or interrupted():
            if ckpt in _steps_on_disk(manager):
                return  # restoring it names what is missing
            existing = sorted(_steps_on_disk(manager))
            raise FileNotFoundError(
                f"Checkpoint {ckpt} is not in {manager.directory} (existing: {existing}) and "
                + (f"did not appear within {limit:.0f} s (config.eval.ckpt_wait_secs)."
                   if limit > 0 else "no training run is writing to this workdir; check "
                   "--workdir and config.eval.begin_ckpt/end_ckpt, or set "
                   "config.eval.ckpt_wait_secs to wait for one."))
        logging.info("Waiting for checkpoint %d in %s ...", ckpt, manager.directory)
        time.sleep(poll)
        waited += poll


def fid_stats(config, workdir: str | None = None, eval_folder: str = "eval") -> str:
    """Inception pool_3 features of every training image (uint8, no dequantization).

    Writes `evaluation.dataset_stats_path(config)` with key 'pool_3'; returns its path.
    """
    del eval_folder  # the statistics belong to the data set, not to a run
    config = prepare(config, "eval", workdir)
    scorer = InceptionScorer(config, make_mesh())
    train_ds, _, _ = datasets.get_dataset(config, uniform_dequantization=False,
                                          evaluation=True)
    pools = []
    for batch in logs.progress(train_ds, None, "dataset statistics", config.eval.show_progress):
        pools.append(scorer(evaluation.images_to_uint8(batch["image"].numpy()))["pool_3"])
    pools = np.concatenate(pools)
    path = evaluation.dataset_stats_path(config)
    if files.is_chief():
        evaluation.save_stats(path, pools)
    logging.info("Wrote Inception statistics of %d images to %s", len(pools), path)
    return path
