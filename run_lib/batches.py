"""What every generating mode shares: the checkpoint it loads, its output folder, and work done
in batches that a rerun resumes.

Every generating mode (sample, inpaint, colorize, conditional, likelihood) loads
checkpoint_<config.sample.ckpt> of the workdir (0: the newest) and writes to config.sample.out
('' = <workdir>/<mode>/ckpt_<k>; --mode=sample with a sampler other than the one the workdir's
config.json records: <workdir>/sample/ckpt_<k>/<sampler tag>, e.g. dpm_solver_20_order2, so that
samplers can be compared one run after another). Work is split into batches of
config.eval.batch_size (the last one only as large as needed), sharded over every device of
every host; each finished batch is saved as <out>/batches/batch_<i>.npz
(with a PNG grid where it holds images), so a killed run resumes at its first missing batch, and
the random key of batch i is fold_in(key, i), so resuming reproduces an uninterrupted run
exactly. <out>/batches/settings.json records what the batches depend on; a rerun with other
settings stops rather than mixing results (raising sample.num_samples later just adds batches).
"""

from __future__ import annotations

import glob
import json
import os

import jax
import numpy as np
from absl import logging

import fast_samplers
from run_lib import checkpoints, faults, files, logs
from run_lib.build import build
from run_lib.checks import UsageError
from run_lib.devices import batch_sharded, make_mesh, replicated, to_global
from run_lib.interrupt import Interrupted, interrupted
from run_lib.steps import stream


class Run:
    """What a generating mode works with: config, mesh, SDE, model, restored state, folder."""

    def __init__(self, config, workdir: str, mode: str):
        self.config, self.workdir, self.mode = config, workdir, mode
        files.check_workdir(workdir, must_exist=True)
        self.mesh = make_mesh()
        self.sde, self.model = build(config)
        self.state, self.ckpt = load_checkpoint(config, workdir, self.mesh)
        self.folder = output_folder(config, workdir, mode, self.ckpt)
        self.key = stream(jax.random.PRNGKey(config.seed), mode)
        self.batch_size = int(config.eval.batch_size)
        self.sharding = batch_sharded(self.mesh)
        logging.info("%s: checkpoint_%d (step %d) of %s -> %s", mode, self.ckpt,
                     int(self.state.step), workdir, self.folder)

    def settings(self, **extra) -> dict:
        """What a batch's content depends on (besides its index)."""
        c = self.config
        return {"mode": self.mode, "ckpt": self.ckpt, "step": int(self.state.step),
                "seed": c.seed, "batch_size": self.batch_size, "sampling": c.sampling.to_dict(),
                **extra}

    def shard(self, batch: np.ndarray):
        """A whole global batch (the same on every host) as a batch-sharded global array."""
        local = batch.shape[0] // jax.process_count()
        start = jax.process_index() * local
        return to_global(batch[start:start + local], self.sharding)

    def batch_key(self, i: int):
        return jax.random.fold_in(self.key, i)

    def run_batches(self, n_batches: int, produce, settings: dict, desc: str,
                    grid_key: str | None = None, sizes=None) -> dict[str, np.ndarray]:
        return run_batches(self.folder, n_batches, produce, settings, desc,
                           self.config.eval.show_progress, grid_key, sizes)

    def sizes(self, n: int) -> list[int]:
        """Rows of each batch of n rows: full batches, then what is left."""
        return batch_sizes(n, self.batch_size)

    def computed_size(self, rows: int) -> int:
        """The batch size computed for `rows` rows: rows rounded up to a multiple of the device
        count (the batch is split evenly over devices)."""
        return computed_size(rows)


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Rows of each batch of n rows: full batches of batch_size, then what is left."""
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


def computed_size(rows: int) -> int:
    """rows rounded up to a multiple of the global device count."""
    d = jax.device_count()
    return -(-rows // d) * d


def load_checkpoint(config, workdir: str, mesh):
    """(state, k): checkpoint_<config.sample.ckpt> of the workdir (0: the newest)."""
    folder = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"No checkpoints in {workdir} ({folder} does not exist); train "
                                "with --mode=train first, or check --workdir.")
    snapshots, _ = checkpoints.managers(workdir, config, create=False)
    steps = sorted(snapshots.all_steps())
    k = int(config.sample.ckpt) or (steps[-1] if steps else 0)
    if k not in steps:
        raise FileNotFoundError(f"No checkpoint_{k} in {folder} (existing: {steps}); set "
                                "config.sample.ckpt to one of them, or 0 for the newest.")
    abstract = checkpoints.abstract_state(config, jax.random.PRNGKey(config.seed),
                                          replicated(mesh))
    return checkpoints.restore(snapshots, k, abstract), k


def output_folder(config, workdir: str, mode: str, ckpt: int) -> str:
    """Where a mode writes for checkpoint `ckpt`: config.sample.out, else <workdir>/<mode>/ckpt_k.

    `sample` gives each sampler setting its own folder, so that samplers can be compared one
    run after another: the first one sampled takes sample/ckpt_<k>/ itself (where samples.npz
    is documented), every other one the subfolder named after it (`sampler_tag`)."""
    out = config.sample.out
    if out:
        return out if os.path.isabs(out) else os.path.join(workdir, out)
    folder = os.path.join(workdir, mode, f"ckpt_{ckpt}")
    if mode != "sample":
        return folder
    tag = sampler_tag(config)
    recorded = _recorded_sampler(folder)
    return folder if recorded in (None, tag) else os.path.join(folder, tag)


def _recorded_sampler(folder: str) -> str | None:
    """The sampler tag of the batches in `folder` (None: it holds none yet)."""
    try:
        with open(os.path.join(folder, "batches", "settings.json")) as f:
            settings = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return ""  # unreadable: not a folder to add to
    return str(settings.get("sampler", "")) if isinstance(settings, dict) else ""


def sampler_tag(config) -> str:
    """A folder name for the sampler config.sampling names: its method and steps, and the
    settings that most often differ between runs compared (e.g. euler_maruyama_none_500,
    dpm_solver_19_order2, ode_dopri5)."""
    sc = config.sampling
    method = str(sc.method).lower()
    if method == "pc":
        tag = f"{sc.predictor}_{sc.corrector}_{config.model.num_scales}"
        if str(sc.corrector).lower() != "none":
            tag += f"_snr{sc.snr:g}_x{sc.n_steps_each}"
        return tag + ("_pflow" if sc.probability_flow else "")
    if method == "ode":
        return f"ode_{sc.ode_method}_tol{sc.ode_rtol:g}"
    if method in fast_samplers.DEFAULT_SCHEDULES:
        tag = f"{method}_{sc.num_steps}"
        if method in fast_samplers.ORDERS:
            tag += f"_order{sc.order}"
        if method == "unipc":
            tag += f"_{sc.unipc_variant}"
        if method == "ddim" and sc.eta:
            tag += f"_eta{sc.eta:g}"
        if method == "heun" and sc.churn:
            tag += f"_churn{sc.churn:g}"
        if sc.get("thresholding", "none") != "none":
            tag += f"_{sc.thresholding}"
        return tag
    return method


def _check_settings(folder: str, settings: dict) -> None:
    path = os.path.join(folder, "settings.json")
    text = json.dumps(settings, indent=1, sort_keys=True, default=str)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        new = json.loads(text)
        if old != new:
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise UsageError(
                f"{folder} holds batches made with other settings (different {', '.join(keys)}); "
                "set config.sample.out to another folder, or delete that one to start over.")
    elif files.is_chief():
        os.makedirs(folder, exist_ok=True)
        files.atomic_write_text(path, text)


def run_batches(folder: str, n_batches: int, produce, settings: dict, desc: str,
                show_progress: bool = True, grid_key: str | None = None, sizes=None):
    """Runs `produce(i) -> {name: array [b, ...]}` for every batch i not on disk yet, saving
    each as <folder>/batches/batch_<i>.npz (and .png of `grid_key`); returns the arrays of all
    batches concatenated along the first axis.

    sizes: the rows each batch must hold, where known; a batch on disk with another count (the
    short last batch of a run that asked for fewer) is made again."""
    bdir = os.path.join(folder, "batches")
    _check_settings(bdir, settings)
    for leftover in glob.glob(os.path.join(bdir, "*.tmp-*")):
        os.remove(leftover)  # of a write killed before its rename
    paths = [os.path.join(bdir, f"batch_{i}.npz") for i in range(n_batches)]

    def finished(i):
        if not os.path.exists(paths[i]):
            return False
        if sizes is None:
            return True
        with np.load(paths[i]) as batch:
            return len(batch[batch.files[0]]) == sizes[i]

    done = sum(finished(i) for i in range(n_batches))
    if done:
        logging.info("Resuming: %d of %d batches are already in %s.", done, n_batches, bdir)
    resume = f"finished batches are in {bdir} and the same command resumes after them."
    for i in logs.progress(range(n_batches), n_batches, desc, show_progress):
        if finished(i):
            continue
        if interrupted():
            raise Interrupted(f"Interrupted before batch {i} of {n_batches}; {resume}")
        faults.point("generate.batch", i)
        try:
            arrays = produce(i)
        except Interrupted as e:
            raise Interrupted(f"{e} (batch {i} of {n_batches}); {resume}") from None
        if files.is_chief():
            if grid_key is not None:  # the grid first: a batch counts as done by its .npz
                files.save_image_grid(arrays[grid_key], paths[i][:-4] + ".png")
            files.atomic_savez(paths[i], **arrays)
    parts = [np.load(p) for p in paths]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0].files}


def padded(indices: np.ndarray, start: int, size: int) -> tuple[np.ndarray, int]:
    """indices[start:start + size], padded with its last entry to `size`; and the real count."""
    part = indices[start:start + size]
    return np.concatenate([part, np.repeat(part[-1:], size - len(part))]), len(part)


def write_grid(folder: str, name: str, images: np.ndarray, config, cols=None) -> None:
    """<folder>/<name>.npz (all images) and <name>.png (the first sample.grid_size)."""
    files.atomic_savez(os.path.join(folder, f"{name}.npz"), samples=images)
    shown = images[:max(int(config.sample.grid_size), 1)]
    files.save_image_grid(shown, os.path.join(folder, f"{name}.png"), cols=cols)
