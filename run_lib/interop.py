"""`--mode=import` (and, in run_lib/exporting.py, `--mode=export`): released checkpoints in
and out of a workdir.

import: `pretrained.load(config.pretrained.path, config)` becomes an Orbax snapshot
  <workdir>/checkpoints/checkpoint_<k> (k = config.pretrained.ckpt, or the snapshot index of the
  source's step as training would number it), so that eval, sampling and every other mode run
  on it unchanged. Adam's moments are carried over when the source stores them (score_sde,
  score_sde_pytorch), so training can resume; otherwise the optimizer starts fresh.
export: checkpoint_<k> (config.pretrained.ckpt, 0: the newest) in config.pretrained.format:
  'diffusers' (default): its EMA parameters as a ScoreSdeVePipeline folder
  (config.pretrained.out, '' = <workdir>/diffusers);
  'score_sde_pytorch': a checkpoint_<k>.pth as score_sde_pytorch's utils.save_checkpoint writes
  it (raw and EMA parameters, Adam's moments, step), which its utils.restore_checkpoint loads
  (config.pretrained.out: a .pth file or a folder; '' = <workdir>/score_sde_pytorch).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import optax
from absl import logging

import losses
import pretrained
from models import utils as mutils
from models.param_trees import first_difference, leaf_shapes
from run_lib import checkpoints, files
from run_lib.checks import UsageError, prepare
from run_lib.devices import make_mesh, replicated
from run_lib.training import snapshot_index


def _path(config) -> str:
    path = str(config.pretrained.path)
    if not path:
        raise UsageError("--mode=import needs the checkpoint: give "
                         "--config.pretrained.path=<score_sde checkpoint_<k>, score_sde_pytorch "
                         ".pth or diffusers folder>.")
    if not os.path.exists(path):
        raise UsageError(f"config.pretrained.path={path!r} does not exist.")
    return path


def _checkpoint_number(config, step: int) -> int:
    k = int(config.pretrained.ckpt)
    if k < 0:
        raise UsageError(f"config.pretrained.ckpt={k} must be >= 0 (0: from the source step).")
    # A source without a step (diffusers) still gets checkpoint_1, eval's first candidate.
    return k or max(1, snapshot_index(step, config.training.snapshot_freq))


def _with_adam(opt_state, adam, step: int):
    """opt_state with the source's Adam moments and step counts (warmup continues)."""
    if adam is None:
        return opt_state
    mu, nu, count = adam

    def replace(s):
        if isinstance(s, optax.ScaleByAdamState):
            return s._replace(count=jnp.asarray(count, s.count.dtype), mu=mu, nu=nu)
        if isinstance(s, optax.ScaleByScheduleState):
            return s._replace(count=jnp.asarray(step, s.count.dtype))
        return s

    is_state = lambda s: isinstance(s, (optax.ScaleByAdamState, optax.ScaleByScheduleState))  # noqa: E731
    return jax.tree_util.tree_map(replace, opt_state, is_leaf=is_state)


def _state(config, loaded):
    """The train State of an imported checkpoint, laid out as a fresh run's
    (losses.init_train_state: the same optimizer and rng stream)."""
    _, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    opt_state = losses.get_optimizer(config).init(loaded.params)
    return mutils.State(step=jnp.asarray(loaded.step, jnp.int32), params=loaded.params,
                        opt_state=_with_adam(opt_state, loaded.adam, loaded.step),
                        params_ema=loaded.params_ema, model_state=loaded.model_state or {},
                        rng=step_rng)


def _check_layout(state, abstract) -> None:
    problem = first_difference(leaf_shapes(state), leaf_shapes(abstract), sep=".",
                               where="this config's train state", first=("params",))
    if problem is not None:
        raise UsageError(f"the imported state does not match this config's train state: "
                         f"{problem}.")
    have = jax.tree_util.tree_structure(state)
    want = jax.tree_util.tree_structure(abstract)
    if have != want:  # the same arrays in other containers
        raise UsageError(f"the imported state's layout differs from this config's train state "
                         f"({have} vs {want}).")


def import_checkpoint(config, workdir: str, eval_folder: str = "eval") -> str:
    """Writes the checkpoint at config.pretrained.path as <workdir>/checkpoints/checkpoint_<k>;
    returns that folder."""
    del eval_folder
    config = prepare(config, "import", workdir)
    path = _path(config)
    files.check_workdir(workdir)
    loaded = pretrained.load(path, config)
    k = _checkpoint_number(config, loaded.step)
    snapshots, _ = checkpoints.managers(workdir, config)
    if k in snapshots.all_steps():
        raise UsageError(f"{checkpoints.step_dir(snapshots, k)} exists; give another "
                         f"--config.pretrained.ckpt or --workdir (nothing was overwritten).")
    mesh = make_mesh()
    rng = jax.random.PRNGKey(config.seed)
    abstract = checkpoints.abstract_state(config, rng, replicated(mesh))
    state = _state(config, loaded)
    _check_layout(state, abstract)
    state = jax.device_put(state, replicated(mesh))
    files.save_config(config, workdir)
    checkpoints.save(snapshots, k, state, "snapshot", loaded.step)
    folder = checkpoints.step_dir(snapshots, k)
    logging.info("Imported %s (%s, step %d) as %s; evaluate it with --mode=eval "
                 "--config.eval.begin_ckpt=%d --config.eval.end_ckpt=%d.", path,
                 loaded.format, loaded.step, folder, k, k)
    return folder


# --mode=export lives in run_lib/exporting.py (re-exported here for older imports).
from run_lib.exporting import EXPORT_FORMATS, export  # noqa: E402, F401
