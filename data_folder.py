"""A folder of a user's images (or an `.npz` of them) as a data set: found, decoded once into a
uint8 cache, and read back from a memory map. Needs no TensorFlow; `datasets` builds the
`config.data.dataset='folder'` pipelines on `cached_images`.

Folder layout: PNG, JPEG and WebP files (any case of the extension), found recursively; names
that start with '.' (files and folders) are skipped. When the folder's first level holds
subfolders with images, each such subfolder is one class (label = its index among the sorted
subfolder names, as torchvision's ImageFolder numbers them); when it holds only files, the
images are unlabelled. Images at the top level next to class subfolders are refused (DataError):
they would have no class.

Each image: EXIF orientation applied; converted to grey (ITU-R 601-2 luma, Pillow's 'L') or RGB
(grey repeated, alpha dropped); shorter side resized to S (Pillow's bicubic filter after an
integer box reduction for large factors, `reducing_gap=2`); central S x S crop. An `.npz` (array
'images' or 'samples', or its only array; uint8 [N, H, W(, C)] or float in [0, 1]; optional int
'labels' [N]) is converted the same way, image by image.

Cache: `<cache_dir>/folder-<key>.npy` (uint8 [N, S, S, C]) and `folder-<key>.json` (the files in
order and their classes), written atomically, the .json last. The key hashes the folder's
absolute path, every file's relative path, size and modification time, S and C: a later run on
an unchanged folder reads the cache without decoding anything; any change writes a new cache.
Reading maps the .npy file (`np.load(mmap_mode='r')`), so a data set larger than memory is
streamed from disk through the page cache.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import time

import numpy as np
from absl import logging
from PIL import Image, ImageOps

from data_files import DataError, _npz_array

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CACHE_VERSION = 1
_CHUNK = 512  # images decoded per batch of worker tasks (bounds the memory held in flight)


@dataclasses.dataclass(frozen=True)
class CachedImages:
    """A decoded folder: `images` uint8 [N, S, S, C] (a read-only memmap of the cache file),
    `names` [N] the files' paths relative to the folder (or `npz[i]`), `classes` the sorted
    class names (empty when unlabelled), `class_index` int32 [N] into `classes` (-1 when
    unlabelled), `path` the cache's .npy file."""

    images: np.ndarray
    names: tuple[str, ...]
    classes: tuple[str, ...]
    class_index: np.ndarray
    path: str


# ----------------------------------------------------------------------------- one image


def _fit(img: Image.Image, size: int) -> np.ndarray:
    """Shorter side to `size` (bicubic), then the central size x size crop."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=2.0)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(img.crop((left, top, left + size, top + size)))


def decode_image(path: str, size: int, channels: int) -> np.ndarray:
    """One image file -> uint8 [size, size, channels] (see the module docstring); DataError
    naming the file when it cannot be read."""
    try:
        with Image.open(path) as img:
            # JPEG: let the decoder scale down by 1/2, 1/4 or 1/8 while keeping both sides at
            # least `size` (much faster for large photos; no effect on other formats).
            img.draft("L" if channels == 1 else "RGB", (size, size))
            img.load()
            mode = img.mode
            # 16/32-bit integer or float pixels would be clipped to 8 bits by convert().
            if mode.startswith(("I", "F")):
                raise DataError(f"{path}: pixel mode {mode!r} is not 8-bit; save it with 8 "
                                "bits/channel.")
            img = ImageOps.exif_transpose(img)
            pixels = _fit(img.convert("L" if channels == 1 else "RGB"), size)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot be read as an image ({e}).") from None
    return pixels.reshape(size, size, channels)


# ----------------------------------------------------------------------------- finding files


def find_images(root: str) -> list[str]:
    """The image files under `root`, as sorted paths relative to it ('/'-separated)."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a symbolic link back up the tree
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(name if rel == "." else f"{rel.replace(os.sep, '/')}/{name}")
    return sorted(found)


def _classes_of(root: str, names: list[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """The first-level subfolders as classes: (sorted names, index per file) or ((), -1s)."""
    top = [n.split("/")[0] if "/" in n else None for n in names]
    loose = [n for n, c in zip(names, top, strict=True) if c is None]
    classes = tuple(sorted({c for c in top if c is not None}))
    if classes and loose:
        raise DataError(
            f"{root}: holds {len(loose)} image(s) at its top level (e.g. {loose[0]!r}) next to "
            f"class subfolders {list(classes[:5])}{' ...' if len(classes) > 5 else ''}; put "
            "every image in a class subfolder, or none (unlabelled).")
    if not classes:
        return (), np.full(len(names), -1, np.int32)
    lookup = {c: i for i, c in enumerate(classes)}
    return classes, np.asarray([lookup[c] for c in top], np.int32)


# ----------------------------------------------------------------------------- the cache


def _cache_key(root: str, names: list[str], size: int, channels: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, os.path.abspath(root), size, channels]).encode())
    for name in names:
        st = os.stat(os.path.join(root, name))
        h.update(f"\n{name}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()[:20]


def _open_cache(npy: str, index: str, count: int | None, size: int, channels: int):
    """The cached images and index, or None when absent or not matching (count None: any)."""
    if not (os.path.isfile(index) and os.path.isfile(npy)):
        return None
    try:
        with open(index) as f:
            meta = json.load(f)
        images = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return None
    n = len(meta.get("names", ()))
    if images.shape != (n, size, size, channels) or images.dtype != np.uint8 \
            or meta.get("version") != CACHE_VERSION or count not in (None, n):
        return None
    return images, meta


def _write_cache(npy: str, index: str, count: int, size: int, channels: int, fill, meta):
    """Writes the .npy through `fill(out)` and then the index, each atomically."""
    os.makedirs(os.path.dirname(npy) or ".", exist_ok=True)
    tmp = f"{npy}.{os.getpid()}.tmp"
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(count, size, size, channels))
        fill(out)
        out.flush()
        del out
        os.replace(tmp, npy)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    tmp_index = f"{index}.{os.getpid()}.tmp"
    with open(tmp_index, "w") as f:
        json.dump(meta, f)
    os.replace(tmp_index, index)


def _decode_into(out: np.ndarray, root: str, names: list[str], size: int, channels: int,
                 workers: int) -> None:
    # Pillow releases the GIL while decoding and resizing, so threads decode in parallel.
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        for start in range(0, len(names), _CHUNK):
            chunk = names[start:start + _CHUNK]
            paths = [os.path.join(root, n) for n in chunk]
            try:
                for i, pixels in enumerate(pool.map(decode_image, paths, [size] * len(paths),
                                                    [channels] * len(paths))):
                    out[start + i] = pixels
            except DataError:
                pool.shutdown(cancel_futures=True)
                raise


def _npz_images(path: str) -> tuple[np.ndarray, np.ndarray | None]:
    """An .npz data set: uint8 images [N, H, W, C] (C 1, 3 or 4) and int labels [N] or None."""
    x = _npz_array(path)
    x = x[..., None] if x.ndim == 3 else x
    if x.ndim != 4 or x.shape[0] == 0 or x.shape[-1] not in (1, 3, 4):
        raise DataError(f"{path}: images of shape {list(x.shape)}; expected [N, H, W] or "
                        "[N, H, W, C] (channels last, C in 1, 3, 4) with N >= 1.")
    if np.issubdtype(x.dtype, np.floating):
        lo, hi = float(x.min()), float(x.max())
        if not (0.0 <= lo and hi <= 1.0):  # also catches NaN
            raise DataError(f"{path}: float images must lie in [0, 1]; found [{lo}, {hi}].")
        x = np.round(x * 255.0).astype(np.uint8)
    elif x.dtype != np.uint8:
        raise DataError(f"{path}: dtype {x.dtype}; expected uint8, or float in [0, 1].")
    labels = None
    data = np.load(path, allow_pickle=False)  # read once already by _npz_array
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            labels = np.asarray(data["labels"]) if "labels" in data else None
    if labels is not None:
        if labels.shape != (len(x),) or not np.issubdtype(labels.dtype, np.integer) \
                or (len(labels) and labels.min() < 0):
            raise DataError(f"{path}: 'labels' must be integers >= 0 of shape [{len(x)}]; got "
                            f"{labels.dtype} {list(labels.shape)}.")
    return x, labels


def _npz_fill(x: np.ndarray, size: int, channels: int):
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[x.shape[-1]]

    def fill(out):
        for i, img in enumerate(x):
            img = Image.fromarray(img[..., 0] if mode == "L" else img, mode)
            out[i] = _fit(img.convert("L" if channels == 1 else "RGB"), size).reshape(
                size, size, channels)

    return fill


def cached_images(path: str, image_size: int, channels: int, cache_dir: str,
                  workers: int | None = None) -> CachedImages:
    """The images of a folder (or .npz) at `path`, decoded once into `cache_dir`.

    Returns a `CachedImages` whose `images` are uint8 [N, image_size, image_size, channels].
    Raises FileNotFoundError for a missing path and DataError naming the file for a bad image
    or an empty folder. `workers`: decoding threads (default: the CPU count, at most 16).
    """
    if channels not in (1, 3):
        raise ValueError(f"num_channels={channels}; valid: 1 or 3.")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such folder or .npz file (config.data.data_dir / "
                                "config.data.eval_dir of the 'folder' data set).")
    is_npz = os.path.isfile(path)
    if is_npz and not path.lower().endswith(".npz"):
        raise DataError(f"{path}: not a folder or an .npz file; the 'folder' data set reads a "
                        f"folder of {'/'.join(IMAGE_EXTENSIONS)} images or an .npz of images.")
    names = [os.path.basename(path)] if is_npz else find_images(path)
    if not names:
        raise DataError(f"{path}: the folder holds no images (searched recursively); accepted "
                        f"extensions (any case): {', '.join(IMAGE_EXTENSIONS)}.")
    root = os.path.dirname(path) if is_npz else path
    key = _cache_key(root, names, image_size, channels)
    npy = os.path.join(cache_dir, f"folder-{key}.npy")
    index = os.path.join(cache_dir, f"folder-{key}.json")
    cached = _open_cache(npy, index, None if is_npz else len(names), image_size, channels)
    if cached is None:
        cached = _build(path, names, is_npz, image_size, channels, npy, index, workers)
    images, meta = cached
    return CachedImages(images=images, names=tuple(meta["names"]),
                        classes=tuple(meta["classes"]),
                        class_index=np.asarray(meta["class_index"], np.int32), path=npy)


def _build(path, names, is_npz, image_size, channels, npy, index, workers):
    """Decodes the images of `path` into the cache files; returns them opened."""
    if is_npz:
        x, labels = _npz_images(path)
        count, fill = len(x), _npz_fill(x, image_size, channels)
        names = [f"npz[{i}]" for i in range(count)]
        classes = tuple(str(c) for c in range(int(labels.max()) + 1)) if labels is not None \
            else ()
        class_index = labels.astype(np.int32) if labels is not None \
            else np.full(count, -1, np.int32)
    else:
        classes, class_index = _classes_of(path, names)
        count = len(names)
        workers = workers or min(16, os.cpu_count() or 1)
        fill = lambda out: _decode_into(out, path, names, image_size, channels, workers)
    start = time.time()
    logging.info("Decoding %d images of %s into the cache %s ...", count, path, npy)
    meta = {"version": CACHE_VERSION, "source": os.path.abspath(path),
            "image_size": image_size, "channels": channels, "names": names,
            "classes": list(classes), "class_index": class_index.tolist()}
    _write_cache(npy, index, count, image_size, channels, fill, meta)
    logging.info("Decoded %d images in %.1f s.", count, time.time() - start)
    cached = _open_cache(npy, index, count, image_size, channels)
    if cached is None:
        raise DataError(f"{npy}: the cache just written cannot be read back.")
    return cached


def holdout_split(names: tuple[str, ...] | list[str], fraction: float) -> tuple[np.ndarray,
                                                                                  np.ndarray]:
    """Deterministic (train, eval) index arrays: the round(fraction N) files whose names hash
    lowest form the evaluation split (at least one, and at least one left for training, when
    0 < fraction < 1), both in stored order; the split depends only on the names."""
    n = len(names)
    k = 0 if fraction <= 0 else min(max(round(fraction * n), 1), n - 1)
    order = sorted(range(n), key=lambda i: hashlib.sha1(names[i].encode()).hexdigest())
    held = np.zeros(n, bool)
    held[order[:k]] = True
    return np.flatnonzero(~held), np.flatnonzero(held)
