"""Files a run writes: atomic writes, the config record, sample grids and arrays, summaries.

Every file appears complete or not at all: it is written under a temporary name in the same
folder and renamed into place, so a run killed at any moment leaves no half-written file.
"""

from __future__ import annotations

import glob
import json
import math
import os
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from run_lib import faults
from run_lib.checks import UsageError


def is_chief() -> bool:
    """Host 0 writes the files every host would write alike."""
    return jax.process_index() == 0


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_savez(path: str, **arrays) -> None:
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def check_workdir(workdir: str, must_exist: bool = False) -> None:
    """Raises UsageError if `workdir` cannot hold a run's files (before anything is written)."""
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"--workdir={workdir} is a file, not a directory.")
    if must_exist and not os.path.isdir(path):
        raise UsageError(f"--workdir={workdir} does not exist.")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    # A real write, not os.access: root passes access checks on read-only file systems and
    # immutable folders, then fails on the first save.
    try:
        fd, probe = tempfile.mkstemp(prefix=".score_sde_write_test_", dir=existing)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UsageError(f"--workdir={workdir} is not writable: {existing} is read-only "
                         f"({e.strerror}).") from None


def save_config(config, workdir: str) -> None:
    """Writes `config.json`; a different earlier config is kept as `config.<time>.json`."""
    if not is_chief():
        return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "config.json")
    text = config.to_json_best_effort(indent=2, sort_keys=True)
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        if old == text:
            return
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(os.path.getmtime(path)))
        os.replace(path, os.path.join(workdir, f"config.{stamp}.json"))
    faults.point("config.write")
    atomic_write_text(path, text)


def checked_images(images, what: str) -> np.ndarray:
    """`images` as numpy, or FloatingPointError if any value is NaN or infinite."""
    images = np.asarray(images)
    bad = ~np.isfinite(images)
    if bad.any():
        raise FloatingPointError(
            f"{int(bad.sum())} of {images.size} values of the {what} are NaN or infinite: the "
            "sampler diverged (check the SDE's noise schedule and the sampler settings); "
            "nothing was written.")
    return images


def image_grid(images_uint8: np.ndarray, pad: int = 2, cols: int | None = None) -> np.ndarray:
    """[N, H, W, C] uint8 -> one grid image [rows (H + pad) + pad, ..., C], row by row with
    `cols` images a row (default: roughly square)."""
    n, h, w, c = images_uint8.shape
    cols = int(cols or math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = images_uint8[i]
    return grid


def save_image_grid(images_uint8: np.ndarray, path: str, cols: int | None = None) -> None:
    """Writes [N, H, W, C] uint8 images as a PNG grid (`cols` a row; default roughly square)."""
    grid = image_grid(images_uint8, cols=cols)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp)
    os.replace(tmp, path)


def save_samples(folder: str, images_uint8: np.ndarray, name: str = "sample",
                 step=None) -> None:
    """`<folder>/<name>.npz` (key 'samples', uint8 NHWC) and `<name>.png` (a grid)."""
    os.makedirs(folder, exist_ok=True)
    for leftover in glob.glob(os.path.join(folder, f"{name}.*.tmp-*")):
        os.remove(leftover)  # of a write killed before its rename
    path = os.path.join(folder, f"{name}.npz")
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez_compressed(tmp, samples=images_uint8)
    faults.point("samples.during", step)  # written, not yet renamed into place
    os.replace(tmp, path)
    save_image_grid(images_uint8, os.path.join(folder, f"{name}.png"))


def update_summary(eval_dir: str, key, results: dict) -> None:
    """Merges `results` into `<eval_dir>/summary.json` under `str(key)`."""
    path = os.path.join(eval_dir, "summary.json")
    summary = {}
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
    summary.setdefault(str(key), {}).update(results)
    atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=True))
