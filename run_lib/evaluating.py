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
from run_lib.checks import validate_config
from run_lib.devices import make_mesh, replicated
from run_lib.evaluators import InceptionScorer, enabled_evaluators
from run_lib.steps import build, stream


def evaluate(config, workdir: str, eval_folder: str = "eval") -> None:
    """Evaluates checkpoints begin_ckpt..end_ckpt: loss, bits/dim and sample quality.

    Writes under workdir/<eval_folder>/: ckpt_<k>_loss.npz, ckpt_<k>_bpd.npz,
    ckpt_<k>/samples_<r>.npz and statistics_<r>.npz per sampling round, report_<k>.npz
    (IS, FID, KID) and summary.json. A killed evaluation resumes at its next unfinished
    sampling round and reproduces the uninterrupted result exactly.
    """
    validate_config(config, "eval")
    ec = config.eval
    eval_dir = os.path.join(workdir, eval_folder)
    os.makedirs(eval_dir, exist_ok=True)
    mesh = make_mesh()
    sde, model = build(config)
    evaluators = enabled_evaluators(config, sde, model, mesh, eval_dir)
    rng = jax.random.PRNGKey(config.seed)
    abstract = checkpoints.abstract_state(config, rng, replicated(mesh))
    snapshots, _ = checkpoints.managers(workdir, config)
    for ckpt in range(ec.begin_ckpt, ec.end_ckpt + 1):
        _wait_for_checkpoint(snapshots, ckpt, config)
        state = checkpoints.restore(snapshots, ckpt, abstract)
        results = {"step": int(state.step)}
        ckpt_key = jax.random.fold_in(rng, ckpt)
        for name, evaluator in evaluators.items():
            results.update(evaluator.run(state, ckpt, stream(ckpt_key, name)))
        if files.is_chief():
            files.update_summary(eval_dir, ckpt, results)
        logging.info("ckpt %d: %s", ckpt, results)


def _wait_for_checkpoint(manager, ckpt, config):
    waited, poll = 0.0, min(60.0, max(1.0, float(config.eval.ckpt_wait_secs) / 10))
    while ckpt not in manager.all_steps(read=True):
        if waited >= config.eval.ckpt_wait_secs:
            raise FileNotFoundError(
                f"Checkpoint {ckpt} did not appear in {manager.directory} within "
                f"{config.eval.ckpt_wait_secs} s (config.eval.ckpt_wait_secs); existing: "
                f"{list(manager.all_steps(read=True))}.")
        logging.info("Waiting for checkpoint %d in %s ...", ckpt, manager.directory)
        time.sleep(poll)
        waited += poll


def fid_stats(config, workdir: str | None = None) -> str:
    """Inception pool_3 features of every training image (uint8, no dequantization).

    Writes `evaluation.dataset_stats_path(config)` with key 'pool_3'; returns its path.
    """
    validate_config(config, "eval")
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
