"""`--mode=export`: checkpoint_<k> of a workdir (config.pretrained.ckpt, 0: the newest) in
config.pretrained.format:
  'diffusers' (default): its EMA parameters as a ScoreSdeVePipeline folder
  (config.pretrained.out, '' = <workdir>/diffusers);
  'score_sde_pytorch': a checkpoint_<k>.pth as score_sde_pytorch's utils.save_checkpoint writes
  it (raw and EMA parameters, Adam's moments, step), which its utils.restore_checkpoint loads
  (config.pretrained.out: a .pth file or a folder; '' = <workdir>/score_sde_pytorch).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import optax
from absl import logging

import pretrained
from run_lib import checkpoints, files
from run_lib.checks import UsageError, prepare
from run_lib.devices import make_mesh, replicated

EXPORT_FORMATS = ("diffusers", "score_sde_pytorch")


def _adam(opt_state):
    """(mu, nu, count) of the optimizer state's Adam, or None."""
    found = [s for s in jax.tree_util.tree_leaves(
        opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)]
    if len(found) != 1:
        return None
    s = found[0]
    return (jax.tree_util.tree_map(np.asarray, s.mu), jax.tree_util.tree_map(np.asarray, s.nu),
            int(s.count))


def export(config, workdir: str, eval_folder: str = "eval") -> str:
    """Writes a workdir checkpoint in config.pretrained.format; returns the folder or file."""
    del eval_folder
    config = prepare(config, "export", workdir)
    fmt = str(config.pretrained.format)
    if fmt not in EXPORT_FORMATS:
        raise UsageError(f"config.pretrained.format={fmt!r}; valid: {list(EXPORT_FORMATS)}")
    param = config.model.get("parameterization", "eps")
    if param != "eps":
        raise UsageError(f"config.model.parameterization={param!r}: the PyTorch formats "
                         f"{list(EXPORT_FORMATS)} hold the paper's output convention only "
                         "('eps'); nothing was written.")
    files.check_workdir(workdir, must_exist=True)
    out = str(config.pretrained.out) or os.path.join(workdir, fmt)
    snapshots, _ = checkpoints.managers(workdir, config, create=False)
    steps = sorted(snapshots.all_steps())
    k = int(config.pretrained.ckpt) or (steps[-1] if steps else 0)
    if k not in steps:
        raise FileNotFoundError(f"Checkpoint {k} is not in {snapshots.directory} (existing: "
                                f"{steps}); set --config.pretrained.ckpt.")
    if fmt == "score_sde_pytorch" and not out.endswith(".pth"):
        out = os.path.join(out, f"checkpoint_{k}.pth")
    if fmt == "score_sde_pytorch" and os.path.exists(out):
        raise UsageError(f"{out} exists; give another --config.pretrained.out (nothing was "
                         "overwritten).")
    abstract = checkpoints.abstract_state(config, jax.random.PRNGKey(config.seed),
                                          replicated(make_mesh()))
    state = checkpoints.restore(snapshots, k, abstract)
    params = jax.tree_util.tree_map(np.asarray, state.params_ema)
    if fmt == "score_sde_pytorch":
        folder = pretrained.export_score_sde_pytorch(
            config, jax.tree_util.tree_map(np.asarray, state.params), out, params_ema=params,
            adam=_adam(state.opt_state), step=int(state.step))
    else:
        folder = pretrained.export_diffusers(config, params, out)
    logging.info("Exported checkpoint %d (step %d) as %s to %s.", k, int(state.step), fmt,
                 folder)
    return folder
