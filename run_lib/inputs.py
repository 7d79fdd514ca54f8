"""The inputs of the controllable modes: images (a data set split or a user's files), inpainting
masks and class labels, from config.controllable.

Parsers raise ValueError naming the config key, the bad value and the valid choices, so
`checks` can report them before anything is built; readers raise FileNotFoundError or
`datasets.DataError` naming the file.
"""

from __future__ import annotations

import jax
import numpy as np

import data_files
import datasets
from run_lib.devices import gather

SPLITS = ("test", "train")
MASKS = ("half", "box", "random", "file")
HALVES = ("lower", "upper", "left", "right")


def parse_labels(text: str, num_classes: int) -> list[int]:
    """config.controllable.labels -> class ids: 'all' = 0..num_classes-1, or '3' / '0,5,7'."""
    text = str(text).strip()
    if text.lower() == "all":
        return list(range(num_classes))
    try:
        labels = [int(part) for part in text.replace(" ", "").split(",") if part != ""]
    except ValueError:
        labels = []
    if not labels:
        raise ValueError(f"config.controllable.labels={text!r}; valid: 'all' or class ids "
                         f"separated by commas, e.g. '3' or '0,5,7'")
    bad = [y for y in labels if not 0 <= y < num_classes]
    if bad:
        raise ValueError(f"config.controllable.labels={text!r}: {bad[0]} is not a class; valid: "
                         f"0..{num_classes - 1} (config.classifier.num_classes={num_classes})")
    return labels


def parse_box(text: str, size: int) -> tuple[int, int, int, int]:
    """config.controllable.box -> (top, left, height, width) inside a size x size image."""
    text = str(text).strip().lower()
    if text == "center":
        side = size // 2
        return (size - side) // 2, (size - side) // 2, side, side
    try:
        top, left, height, width = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"config.controllable.box={text!r}; valid: 'center' or "
                         "'top,left,height,width' in pixels") from None
    if not (top >= 0 and left >= 0 and height >= 1 and width >= 1
            and top + height <= size and left + width <= size):
        raise ValueError(f"config.controllable.box={text!r} does not lie inside the {size}x{size} "
                         "image (top,left,height,width in pixels)")
    return top, left, height, width


def check_mask_settings(config) -> None:
    """ValueError for a bad mask kind or parameter (what `masks` would fail on)."""
    c = config.controllable
    if c.mask not in MASKS:
        raise ValueError(f"config.controllable.mask={c.mask!r}; valid: {list(MASKS)}")
    if c.mask == "half" and c.half not in HALVES:
        raise ValueError(f"config.controllable.half={c.half!r}; valid: {list(HALVES)}")
    if c.mask == "box":
        parse_box(c.box, config.data.image_size)
    if c.mask == "random" and not 0.0 < float(c.rate) <= 1.0:
        raise ValueError(f"config.controllable.rate={c.rate} must be in (0, 1]")
    if c.mask == "file" and not c.mask_path:
        raise ValueError("config.controllable.mask='file' needs config.controllable.mask_path "
                         "(an image or .npz whose white pixels are filled in)")


def masks(config, n: int, rng: np.random.Generator) -> np.ndarray:
    """Known-pixel masks [n, S, S, 1] float32 (1 = known, 0 = filled in) for n inputs."""
    c, size = config.controllable, config.data.image_size
    known = np.ones((n, size, size, 1), np.float32)
    if c.mask == "half":
        half = size // 2
        region = {"lower": np.s_[:, size - half:], "upper": np.s_[:, :half],
                  "left": np.s_[:, :, :half], "right": np.s_[:, :, size - half:]}[c.half]
        known[region] = 0.0
    elif c.mask == "box":
        top, left, height, width = parse_box(c.box, size)
        known[:, top:top + height, left:left + width] = 0.0
    elif c.mask == "random":
        known = (rng.random((n, size, size, 1)) >= float(c.rate)).astype(np.float32)
    else:
        # n + 1 at most: enough to tell a file of too many masks, never more.
        files, _ = data_files.load_images(c.mask_path, size, 1, max_images=n + 1)
        if len(files) not in (1, n):
            raise datasets.DataError(
                f"{c.mask_path}: holds {len(files)} masks; expected 1 (for every input) or one "
                f"per input ({n}).")
        known = np.broadcast_to((files < 128).astype(np.float32), known.shape).copy()
    return known


def read_images(config, num_channels: int | None = None) -> tuple[np.ndarray, list[str]]:
    """uint8 [N, S, S, C] inputs from config.controllable.source, and their names.

    A split ('test' / 'train') gives its first num_inputs images in stored order (every host
    reads its shard; the shards are gathered); a folder or .npz gives its images in name order,
    the first num_inputs of them (0 = all). C is num_channels (default config.data's):
    colour images become grey for 1 channel, grey ones are repeated for 3.
    """
    c = config.controllable
    channels = int(num_channels or config.data.num_channels)
    limit = int(c.num_inputs)
    if c.source in SPLITS:
        return _split_images(config, c.source, limit, channels)
    # Only the images used are read (of an .npz, only their bytes).
    return data_files.load_images(c.source, config.data.image_size, channels,
                                  max_images=max(limit, 0))


def _split_images(config, split: str, limit: int, channels: int):
    train_ds, test_ds, _ = datasets.get_dataset(config, evaluation=True)
    parts, have = [], 0
    for batch in (test_ds if split == "test" else train_ds):
        # The pipeline's floats are exactly k / 255.
        parts.append(np.round(batch["image"].numpy() * 255.0).astype(np.uint8))
        have += len(parts[-1]) * jax.process_count()
        if have >= limit:
            break
    if not parts:
        raise datasets.DataError(f"The {split} split of {config.data.dataset} holds fewer "
                                 f"images than one batch (config.eval.batch_size).")
    images = gather(np.concatenate(parts))[:limit]
    if images.shape[-1] != channels:  # a grey data set given to a colour mode
        images = np.repeat(images, channels, axis=-1)
    return images, [f"{split}[{i}]" for i in range(len(images))]

