"""Checkpoints: Orbax snapshots and preemption checkpoints, the input pipeline's position.

  checkpoints/checkpoint_<k>   snapshot every snapshot_freq steps (k = step / snapshot_freq)
  checkpoints-meta/<step>      latest state every snapshot_freq_for_preemption steps
  checkpoints-meta/data/process_<i>/step_<step>.*   host i's input-pipeline position
"""

from __future__ import annotations

import glob
import os

import jax
import orbax.checkpoint as ocp
import tensorflow as tf

import losses
from run_lib.checks import CheckpointError
from run_lib.devices import compile_once


def managers(workdir: str, config):
    """(snapshots, meta) Orbax managers of a workdir."""
    workdir = os.path.abspath(workdir)
    keep = int(config.training.get("max_ckpts_to_keep", 0)) or None
    snapshots = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             step_prefix="checkpoint",
                                             enable_async_checkpointing=False))
    meta = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints-meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                             enable_async_checkpointing=False))
    return snapshots, meta


def _state_init_fn(config):
    return lambda key: losses.init_train_state(key, config)[1]


def init_state(config, rng, sharding):
    """The initial train State, created directly with the given (replicated) sharding."""
    return compile_once(_state_init_fn(config), rng, out_shardings=sharding)


def abstract_state(config, rng, sharding):
    """Shapes, dtypes and shardings of the train State, without allocating it."""
    shapes = jax.eval_shape(_state_init_fn(config), rng)
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def restore(manager, step, abstract):
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # a truncated or foreign checkpoint: say which and stop
        raise CheckpointError(
            f"Could not restore checkpoint {step} from {manager.directory}: {e}. The files "
            "are left untouched; move the damaged checkpoint away to resume from an older "
            "one.") from e


def save(manager, step, state):
    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def _data_state_prefix(workdir, step):
    return os.path.join(os.path.abspath(workdir), "checkpoints-meta", "data",
                        f"process_{jax.process_index()}", f"step_{step}")


def save_data_state(workdir, step, iterator):
    """Saves this host's input-pipeline position so a resumed run reads the same batches."""
    prefix = _data_state_prefix(workdir, step)
    tf.train.Checkpoint(iterator=iterator).write(prefix)
    # keep the two newest pipeline states (the meta checkpoint keeps one)
    folder = os.path.dirname(prefix)
    steps = sorted({int(os.path.basename(p).split(".")[0][5:])
                    for p in glob.glob(os.path.join(folder, "step_*"))})
    for old in steps[:-2]:
        for f in glob.glob(os.path.join(folder, f"step_{old}.*")):
            os.remove(f)


def restore_data_state(workdir, step, iterator) -> bool:
    prefix = _data_state_prefix(workdir, step)
    if not os.path.exists(prefix + ".index"):
        return False
    tf.train.Checkpoint(iterator=iterator).read(prefix).assert_consumed()
    return True
