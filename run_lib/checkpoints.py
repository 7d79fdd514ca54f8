"""Checkpoints that survive kills, full disks and damaged files.

  checkpoints/checkpoint_<k>/   snapshot k (Orbax): the state at step k * snapshot_freq, or the
                                final step of a run that ended between two multiples (never
                                overwritten: a longer run's step goes to the next free k)
  checkpoints-meta/<step>/      the newest META_KEEP states, every snapshot_freq_for_preemption
  checkpoints-meta/data/process_<i>/step_<step>/   host i's input-pipeline position
  <checkpoint dir>/score_sde_manifest.json         the step and the SHA-256 of every file

Orbax writes each checkpoint to a temporary directory and renames it into place, and the
pipeline position is written the same way, so a kill leaves either a complete checkpoint or
debris that is ignored and cleaned up at the next start. The manifest lets a restore refuse
a checkpoint whose bytes changed after it was written (naming the file) and fall back to an
older one; a checkpoint without its manifest (a kill between Orbax's rename and the manifest,
or a partial copy), or with a damaged one, is unverified and treated the same way.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import logging as pylogging
import os
import re
import shutil
import sys
import threading

import jax
import orbax.checkpoint as ocp
import tensorflow as tf
from absl import logging

import losses
from models import param_trees
from run_lib import faults, files
from run_lib.checks import CheckpointError
from run_lib.devices import compile_once

MANIFEST = "score_sde_manifest.json"
META_KEEP = 2  # so that a damaged newest preemption checkpoint has an older one to fall back to


class DamagedCheckpointError(CheckpointError):
    """A checkpoint whose files are missing, truncated or changed since they were written."""


class IncompleteCheckpointError(DamagedCheckpointError):
    """A checkpoint folder without its manifest: a write that did not finish or a partial copy."""


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
    """The manifest of a checkpoint folder; None if it has none. DamagedCheckpointError if it
    cannot be read or is not a manifest (a truncated or garbled file)."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
        if not (isinstance(manifest, dict) and isinstance(manifest.get("train_step"), int)
                and isinstance(manifest.get("sha256"), dict)):
            raise ValueError("not a manifest (no train_step and sha256)")
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise DamagedCheckpointError(f"{path} is damaged ({e}): the checkpoint cannot be "
                                     "verified.") from None
    return manifest


def has_manifest(folder: str) -> bool:
    return os.path.exists(os.path.join(folder, MANIFEST))


def verify(folder: str) -> dict:
    """Checks a checkpoint's files against its manifest; returns the manifest. Raises
    IncompleteCheckpointError without a manifest (every checkpoint this project writes has one:
    a folder without it is a write that did not finish or a partial copy), and
    DamagedCheckpointError naming the first bad file."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise IncompleteCheckpointError(
            f"{folder} has no {MANIFEST}: the checkpoint is incomplete (a write that did not "
            "finish, or a partial copy) and cannot be verified.")
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

def state_bytes(state) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state))


def save(manager, step: int, state, phase: str, train_step: int,
         data_bytes: int | None = None) -> None:
    """Saves `state` as `step` of `manager` with its manifest; `phase` names the fault points.
    `data_bytes`: the size of the input-pipeline state saved with it (for the log line)."""
    faults.point(f"{phase}.before", train_step)
    faults.watch(f"{phase}.during", train_step, os.path.join(str(manager.directory), "*tmp*"))
    # What the previous checkpoint takes on disk (Orbax adds metadata to the arrays' bytes).
    previous = max(manager.all_steps(), default=None)
    on_disk = _folder_bytes(step_dir(manager, previous)) if previous is not None else 0
    with _HeldNoise() as noise:
        try:
            faults.point(f"{phase}.write", train_step)
            manager.save(step, args=ocp.args.StandardSave(state), force=True)
            manager.wait_until_finished()
        except Exception as e:
            if _is_disk_full(e):
                noise.drop = True
                _remove_debris(str(manager.directory))
                raise _disk_full(str(manager.directory), max(state_bytes(state), on_disk),
                                 data_bytes) from None
            raise
    faults.point(f"{phase}.manifest", train_step)
    write_manifest(step_dir(manager, step), train_step, data_bytes)
    faults.point(f"{phase}.after", train_step)


def _fmt_bytes(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB" if n >= 2**10 \
        else f"{n} bytes"


def write_manifest(folder: str, train_step: int, data_bytes: int | None = None) -> None:
    """Records the training step and the SHA-256 of every file of a committed checkpoint."""
    if files.is_chief():
        manifest = {"train_step": int(train_step), "sha256": _file_hashes(folder)}
        files.atomic_write_text(os.path.join(folder, MANIFEST), json.dumps(manifest, indent=1))
        size = sum(os.path.getsize(os.path.join(folder, rel)) for rel in manifest["sha256"])
        data = "" if data_bytes is None else f"; input-pipeline state {_fmt_bytes(data_bytes)}"
        logging.info("Saved %s (step %d, %s%s).", folder, train_step, _fmt_bytes(size), data)


def _folder_bytes(folder: str) -> int:
    """What a folder's files take on disk (whole blocks)."""
    return sum(os.stat(os.path.join(root, n)).st_blocks * 512
               for root, _, names in os.walk(folder) for n in names)


class _HeldNoise:
    """What libraries report while a save runs: their log records of WARNING and above, and
    the tracebacks of their threads. On a full disk Orbax's threads fail one by one, each with
    an error line and a traceback, and would bury the one line that says what happened."""

    def __init__(self):
        self.held, self.drop = [], False
        self._hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)

    def filter(self, record) -> bool:
        if record.levelno >= pylogging.WARNING and "site-packages" in (record.pathname or ""):
            self.held.append(("log", record))
            return False
        return True

    def __enter__(self):
        for name in _NOISY_LOGGERS:
            pylogging.getLogger(name).addFilter(self)
        sys.excepthook = lambda *a: self.held.append(("excepthook", a))
        threading.excepthook = lambda a: self.held.append(("thread", a))
        sys.unraisablehook = lambda u: self.held.append(("unraisable", u))
        return self

    def __exit__(self, *exc):
        for name in _NOISY_LOGGERS:
            pylogging.getLogger(name).removeFilter(self)
        if self.drop:
            _silence_for_exit()
            return False
        sys.excepthook, threading.excepthook, sys.unraisablehook = self._hooks
        for kind, item in self.held:  # anything else: shown as it would have been
            if kind == "log":
                pylogging.getLogger(item.name).handle(item)
            elif kind == "excepthook":
                sys.excepthook(*item)
            elif kind == "thread":
                threading.excepthook(item)
            else:
                sys.unraisablehook(item)
        return False


_NOISY_LOGGERS = ("absl", "asyncio")


def _ignore(*args) -> None:
    del args


def _silence_for_exit() -> None:
    """The run ends with its one line `error: Disk full ...`: Orbax's threads still failing,
    and its futures garbage-collected at exit, must print nothing after it."""
    sys.excepthook = threading.excepthook = sys.unraisablehook = _ignore
    pylogging.disable(pylogging.CRITICAL)
    pylogging.raiseExceptions = False  # the log file is on the full disk too


def _is_disk_full(error) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


# Room Orbax needs beyond a checkpoint's final size while it writes (its temporary files and
# metadata, and whole file-system blocks): measured on a 3 MB tmpfs, a 1.4 MiB tiny-config
# checkpoint failed with 1.6 MiB free.
WRITE_ROOM = 1.25


def _disk_full(path: str, state_bytes: int | None, data_bytes: int | None) -> DiskFullError:
    """The one line for a full disk: what a preemption checkpoint needs in all (model state and
    input-pipeline state; an unknown part said so) against what is free."""
    free = shutil.disk_usage(path).free if os.path.exists(path) else 0
    parts = [(name, n) for name, n in (("model state", state_bytes),
                                       ("input-pipeline state", data_bytes)) if n is not None]
    needed = int(WRITE_ROOM * sum(n for _, n in parts))
    detail = " + ".join(f"{name} {_fmt_bytes(n)}" for name, n in parts)
    unknown = "" if data_bytes is not None else " + the input-pipeline state"
    return DiskFullError(f"Disk full while writing a checkpoint to {path}: about "
                         f"{_fmt_bytes(needed)} needed ({detail}{unknown}, and room to write "
                         f"them), {_fmt_bytes(free)} free. Existing checkpoints are untouched; "
                         "free space and rerun to resume.")


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
    # Parameters first: they say more about which config wrote a checkpoint than Adam's moments.
    problem = param_trees.first_difference(param_trees.leaf_shapes(stored),
                                           param_trees.leaf_shapes(abstract), sep=".",
                                           where="this config", first=("params",))
    if problem is not None:
        raise ConfigMismatchError(
            f"{step_dir(manager, step)} was written for a different config: {problem}. Use the "
            "config that wrote it (its config.json in the workdir) or another --workdir.")


def restore(manager, step: int, abstract):
    """Restores checkpoint `step` after checking its files and shapes."""
    folder = step_dir(manager, step)
    verify(folder)
    check_matches(manager, step, abstract)
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:
        state = _restore_without_empty_fields(manager, step, abstract)
        if state is None:
            raise DamagedCheckpointError(f"Could not read checkpoint {folder}: {e}") from e
        return state


def _restore_without_empty_fields(manager, step: int, abstract):
    """`abstract`'s state from a checkpoint written without its empty fields, or None.

    The classifier's checkpoints from before it shared the score model's `State` hold
    (step, params, opt_state, rng) only; its `params_ema` and `model_state` are empty, so they
    are restored as the other fields' tree and filled in with {}."""
    if not dataclasses.is_dataclass(abstract):
        return None
    fields = {f.name: getattr(abstract, f.name) for f in dataclasses.fields(abstract)}
    empty = {k for k, v in fields.items() if isinstance(v, dict) and not v}
    if not empty:
        return None
    target = {k: v for k, v in fields.items() if k not in empty}
    try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    except Exception:  # noqa: BLE001 (not that layout either: the caller reports the first error)
        return None
    return abstract.replace(**{k: restored[k] for k in target}, **{k: {} for k in empty})


def restore_newest_good(manager, abstract):
    """(state, step) from the newest meta checkpoint that verifies, falling back to older ones
    with a warning; (None, None) if there is none, or if every one is incomplete (no manifest:
    a write that a kill interrupted). A config mismatch is not damage: it stops."""
    steps = sorted(manager.all_steps(), reverse=True)
    damaged = []
    for step in steps:
        try:
            return restore(manager, step, abstract), step
        except DamagedCheckpointError as e:
            logging.warning("%s Falling back to an older checkpoint.", e)
            damaged.append(e)
    if any(not isinstance(e, IncompleteCheckpointError) for e in damaged):
        raise DamagedCheckpointError("Every preemption checkpoint is damaged:\n  "
                                     + "\n  ".join(map(str, damaged)))
    return None, None


# ---------------------------------------------------------------------------- input pipeline

_DATA_STEP = re.compile(r"^step_(\d+)$")


def _data_folder(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints-meta", "data",
                        f"process_{jax.process_index()}")


class PositionIterator:
    """The training batches of a pipeline that starts at any batch (`make(start_batch)`):
    its state is the number of batches it gave, a few bytes per checkpoint."""

    def __init__(self, make, first=None):
        self._make, self._iter, self.position = make, None if first is None else iter(first), 0

    def get_next(self):
        if self._iter is None:
            self._iter = iter(self._make(self.position))
        batch = self._iter.get_next()
        self.position += 1
        return batch

    def seek(self, position: int) -> None:
        self._iter, self.position = None, int(position)


_POSITION = "position.json"


def save_data_state(workdir: str, step: int, iterator, state_bytes: int | None = None,
                    last_bytes: int | None = None) -> int:
    """Saves this host's input-pipeline state, atomically (temp folder, then rename): the
    position of a PositionIterator, else TensorFlow's iterator state (which holds the shuffle
    buffer). Returns its size in bytes. `state_bytes` (the model state saved next) and
    `last_bytes` (the size of the previous pipeline state) go into a disk-full message."""
    folder = _data_folder(workdir)
    final = os.path.join(folder, f"step_{step}")
    tmp = f"{final}.tmp-{os.getpid()}"
    faults.watch("data_state.during", step, os.path.join(folder, "*.tmp-*", "*"))
    faults.point("data_state.before", step)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        faults.point("data_state.write", step)
        if isinstance(iterator, PositionIterator):
            os.makedirs(tmp)
            with open(os.path.join(tmp, _POSITION), "w") as f:
                json.dump({"batches": iterator.position}, f)
        else:
            tf.train.Checkpoint(iterator=iterator).write(os.path.join(tmp, "pipeline"))
    except Exception as e:
        if _is_disk_full(e) or isinstance(e, tf.errors.ResourceExhaustedError):
            _silence_for_exit()
            shutil.rmtree(tmp, ignore_errors=True)
            raise _disk_full(folder, state_bytes, last_bytes) from None
        raise
    faults.point("data_state.during", step)  # if the watcher has not struck yet
    faults.point("data_state.written", step)
    if os.path.isdir(final):  # a leftover of a run killed after this point: same content
        shutil.rmtree(final)
    os.replace(tmp, final)
    return sum(os.path.getsize(os.path.join(final, n)) for n in os.listdir(final))


def restore_data_state(workdir: str, step: int, iterator) -> bool:
    folder = os.path.join(_data_folder(workdir), f"step_{step}")
    position = os.path.join(folder, _POSITION)
    if isinstance(iterator, PositionIterator):
        if not os.path.exists(position):
            return False
        with open(position) as f:
            iterator.seek(json.load(f)["batches"])
        return True
    prefix = os.path.join(folder, "pipeline")
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
