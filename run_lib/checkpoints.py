"""Checkpoints that survive kills, full disks and damaged files.

  checkpoints/checkpoint_<k>/   snapshot k (Orbax): the state at step k * snapshot_freq, or the
                                final step of a run that ended between two multiples
  checkpoints-meta/<step>/      the newest META_KEEP states, every snapshot_freq_for_preemption
  checkpoints-meta/data/process_<i>/step_<step>/   host i's input-pipeline position
  <checkpoint dir>/score_sde_manifest.json         the step and the SHA-256 of every file

Orbax writes each checkpoint to a temporary directory and renames it into place, and the
pipeline position is written the same way, so a kill leaves either a complete checkpoint or
debris that is ignored and cleaned up at the next start. The manifest lets a restore refuse
a checkpoint whose bytes changed after it was written (naming the file) and fall back to an
older one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil

import jax
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging

import losses
from run_lib import faults, files
from run_lib.checks import CheckpointError
from run_lib.devices import compile_once

MANIFEST = "score_sde_manifest.json"
META_KEEP = 2  # so that a damaged newest preemption checkpoint has an older one to fall back to


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files are missing, truncated or changed since they were written."""


class ConfigMismatchError(CheckpointError):
    """A healthy checkpoint written for a different config (other shapes or parameters)."""


class DiskFullError(OSError):
    """No space left while writing; what was already on disk is untouched.

    Raised with the message alone (no errno), so that it prints as one readable line."""


def managers(workdir: str, config, create: bool = True):
    """(snapshots, meta) Orbax managers of a workdir; `create` makes their folders (training)."""
    workdir = os.path.abspath(workdir)
    keep = int(config.training.get("max_ckpts_to_keep", 0)) or None
    common = dict(create=create, enable_async_checkpointing=False,
                  cleanup_tmp_directories=create, read_only=not create)
    # An explicit handler lets a fresh manager read what an earlier process wrote (metadata).
    snapshots = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, step_prefix="checkpoint",
                                             **common),
        item_handlers=ocp.StandardCheckpointHandler())
    meta = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints-meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=META_KEEP, **common),
        item_handlers=ocp.StandardCheckpointHandler())
    return snapshots, meta


def step_dir(manager, step: int) -> str:
    prefixed = os.path.join(str(manager.directory), f"checkpoint_{step}")
    return prefixed if os.path.isdir(prefixed) else os.path.join(str(manager.directory),
                                                                 str(step))


# ---------------------------------------------------------------------------- the State

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


def _leaf_name(path) -> str:
    """A key path as Orbax names the array ('params.Conv_0.kernel', 'opt_state.1.0.mu...')."""
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
    return ".".join(parts)


def _shapes_by_name(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_leaf_name(path): tuple(leaf.shape) for path, leaf in leaves}


# ---------------------------------------------------------------------------- manifests

def _file_hashes(folder: str) -> dict[str, str]:
    hashes = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel == MANIFEST:
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            hashes[rel] = digest.hexdigest()
    return hashes


def read_manifest(folder: str) -> dict | None:
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def verify(folder: str) -> dict | None:
    """Checks a checkpoint's files against its manifest; returns the manifest (None if the
    checkpoint predates manifests). Raises DamagedCheckpointError naming the first bad file."""
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    actual = _file_hashes(folder)
    for rel, expected in sorted(manifest["sha256"].items()):
        if rel not in actual:
            raise DamagedCheckpointError(f"{os.path.join(folder, rel)} is missing.")
        if actual[rel] != expected:
            raise DamagedCheckpointError(
                f"{os.path.join(folder, rel)} changed after it was written (SHA-256 "
                f"mismatch): the checkpoint is damaged.")
    return manifest


# ---------------------------------------------------------------------------- save / restore

def _state_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))


def save(manager, step: int, state, phase: str, train_step: int) -> None:
    """Saves `state` as `step` of `manager` with its manifest; `phase` names the fault points."""
    faults.point(f"{phase}.before", train_step)
    faults.watch(f"{phase}.during", train_step, os.path.join(str(manager.directory), "*tmp*"))
    try:
        faults.point(f"{phase}.write", train_step)
        manager.save(step, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()
    except Exception as e:
        if _is_disk_full(e):
            _remove_debris(str(manager.directory))
            raise _disk_full(str(manager.directory), _state_bytes(state)) from None
        raise
    faults.point(f"{phase}.manifest", train_step)
    write_manifest(step_dir(manager, step), train_step)
    faults.point(f"{phase}.after", train_step)


def write_manifest(folder: str, train_step: int) -> None:
    """Records the training step and the SHA-256 of every file of a committed checkpoint."""
    if files.is_chief():
        manifest = {"train_step": int(train_step), "sha256": _file_hashes(folder)}
        files.atomic_write_text(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1))
        size = sum(os.path.getsize(os.path.join(folder, rel)) for rel in manifest["sha256"])
        logging.info("Saved %s (step %d, %.1f MiB).", folder, train_step, size / 2**20)


def _is_disk_full(error) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _disk_full(path: str, needed: int) -> DiskFullError:
    free = shutil.disk_usage(path).free if os.path.exists(path) else 0
    return DiskFullError(f"Disk full while writing a checkpoint to {path}: about "
                         f"{needed / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free. "
                         "Existing checkpoints are untouched; free space and rerun to resume.")


def _remove_debris(folder: str) -> None:
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if "tmp" in name:
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def check_matches(manager, step: int, abstract) -> None:
    """Raises ConfigMismatchError unless checkpoint `step` holds the arrays `abstract` expects."""
    try:
        stored = manager.item_metadata(step).tree
    except Exception as e:  # unreadable metadata: damage, not a different config
        raise DamagedCheckpointError(
            f"{step_dir(manager, step)}: unreadable metadata ({e}).") from e
    have, want = _shapes_by_name(stored), _shapes_by_name(abstract)
    # Parameters first: they say more about which config wrote a checkpoint than Adam's moments.
    for name in sorted(set(have) | set(want), key=lambda n: (not n.startswith("params."), n)):
        if have.get(name) != want.get(name):
            raise ConfigMismatchError(
                f"{step_dir(manager, step)} was written for a different config: parameter "
                f"{name!r} has shape {have.get(name, 'absent')} in the checkpoint but "
                f"{want.get(name, 'absent')} in this config. Use the config that wrote it (its "
                "config.json in the workdir) or another --workdir.")


def restore(manager, step: int, abstract):
    """Restores checkpoint `step` after checking its files and shapes."""
    folder = step_dir(manager, step)
    verify(folder)
    check_matches(manager, step, abstract)
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:
        raise DamagedCheckpointError(f"Could not read checkpoint {folder}: {e}") from e


def restore_newest_good(manager, abstract):
    """(state, step) from the newest meta checkpoint that verifies, falling back to older ones
    with a warning; (None, None) if there is none. A config mismatch is not damage: it stops."""
    steps = sorted(manager.all_steps(), reverse=True)
    damaged = []
    for step in steps:
        try:
            return restore(manager, step, abstract), step
        except DamagedCheckpointError as e:
            logging.warning("%s Falling back to an older checkpoint.", e)
            damaged.append(str(e))
    if damaged:
        raise DamagedCheckpointError("Every preemption checkpoint is damaged:\n  "
                                     + "\n  ".join(damaged))
    return None, None


# ---------------------------------------------------------------------------- input pipeline

_DATA_STEP = re.compile(r"^step_(\d+)$")


def _data_folder(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints-meta", "data",
                        f"process_{jax.process_index()}")


def save_data_state(workdir: str, step: int, iterator) -> None:
    """Saves this host's input-pipeline position, atomically (temp folder, then rename)."""
    folder = _data_folder(workdir)
    final = os.path.join(folder, f"step_{step}")
    tmp = f"{final}.tmp-{os.getpid()}"
    faults.watch("data_state.during", step, os.path.join(folder, "*.tmp-*", "*"))
    faults.point("data_state.before", step)
    shutil.rmtree(tmp, ignore_errors=True)
    tf.train.Checkpoint(iterator=iterator).write(os.path.join(tmp, "pipeline"))
    faults.point("data_state.during", step)  # if the watcher has not struck yet
    faults.point("data_state.written", step)
    if os.path.isdir(final):  # a leftover of a run killed after this point: same content
        shutil.rmtree(final)
    os.replace(tmp, final)


def restore_data_state(workdir: str, step: int, iterator) -> bool:
    prefix = os.path.join(_data_folder(workdir), f"step_{step}", "pipeline")
    if not os.path.exists(prefix + ".index"):
        return False
    tf.train.Checkpoint(iterator=iterator).read(prefix).assert_consumed()
    return True


def clean_data_states(workdir: str, keep_steps) -> None:
    """Removes temporary and orphaned pipeline states (steps without a meta checkpoint)."""
    folder = _data_folder(workdir)
    keep = {int(s) for s in keep_steps}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        match = _DATA_STEP.match(name)
        if match is None or int(match.group(1)) not in keep:
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
