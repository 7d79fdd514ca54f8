"""Files a run writes: atomic writes, the config record, sample grids and arrays, summaries.

Every file appears complete or not at all: it is written under a temporary name in the same
folder and renamed into place, so a run killed at any moment leaves no half-written file.
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
from PIL import Image


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


def save_config(config, workdir: str) -> None:
    if is_chief():
        os.makedirs(workdir, exist_ok=True)
        atomic_write_text(os.path.join(workdir, "config.json"),
                          config.to_json_best_effort(indent=2, sort_keys=True))


def image_grid(images_uint8: np.ndarray, pad: int = 2) -> np.ndarray:
    """[N, H, W, C] uint8 -> one roughly square grid image [rows (H + pad) + pad, ..., C]."""
    n, h, w, c = images_uint8.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = images_uint8[i]
    return grid


def save_image_grid(images_uint8: np.ndarray, path: str) -> None:
    """Writes [N, H, W, C] uint8 images as a roughly square PNG grid."""
    grid = image_grid(images_uint8)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp)
    os.replace(tmp, path)


def save_samples(folder: str, images_uint8: np.ndarray, name: str = "sample") -> None:
    """`<folder>/<name>.npz` (key 'samples', uint8 NHWC) and `<name>.png` (a grid)."""
    os.makedirs(folder, exist_ok=True)
    atomic_savez(os.path.join(folder, f"{name}.npz"), samples=images_uint8)
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
