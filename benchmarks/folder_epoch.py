"""Time of the first and of a later epoch of a `config.data.dataset='folder'` training pipeline.

    python benchmarks/folder_epoch.py [--num_images=10000] [--image_size=32] [--batch_size=128]

Writes `num_images` generated images (half PNG, half JPEG; sizes 32-64 px, so most are
resized) into a temporary folder with 10 class subfolders, then builds the training pipeline
of `datasets.get_dataset` and times: the first epoch (decoding every file into the uint8 cache,
filling the shuffle buffer, num_images // batch_size batches), a later epoch (read from the
cache's memory map), and a second `get_dataset` call on the unchanged folder (the cache reused:
time to its first batch). Prints one line per figure; not a test.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import ml_collections
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402


def write_images(root: str, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(32, 65, size=2))
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([(yy * (c + 1) + xx * 3 + i) % 256 for c in range(3)], -1)
        img = np.clip(img + rng.integers(-8, 9, size=img.shape), 0, 255).astype(np.uint8)
        folder = os.path.join(root, f"class_{i % 10}")
        os.makedirs(folder, exist_ok=True)
        ext = "png" if i % 2 == 0 else "jpg"
        Image.fromarray(img).save(os.path.join(folder, f"{i:06d}.{ext}"))


def config_for(data_dir: str, cache_dir: str, image_size: int, batch_size: int):
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict(dict(
        dataset="folder", data_dir=data_dir, cache_dir=cache_dir, image_size=image_size,
        num_channels=3, random_flip=True, centered=False, uniform_dequantization=False,
        eval_dir="", eval_fraction=0.0, eval_split=""))
    config.training = ml_collections.ConfigDict(dict(batch_size=batch_size, n_jitted_steps=1))
    config.eval = ml_collections.ConfigDict(dict(batch_size=batch_size))
    return config


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--num_images", type=int, default=10000)
    parser.add_argument("--image_size", type=int, default=32)
    parser.add_argument("--batch_size", type=int, default=128)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="folder_epoch_") as tmp:
        data_dir, cache_dir = os.path.join(tmp, "images"), os.path.join(tmp, "cache")
        start = time.perf_counter()
        write_images(data_dir, args.num_images)
        print(f"wrote {args.num_images} images in {time.perf_counter() - start:.1f} s")
        config = config_for(data_dir, cache_dir, args.image_size, args.batch_size)
        per_epoch = args.num_images // args.batch_size

        start = time.perf_counter()
        iterator = iter(datasets.get_dataset(config)[0])
        built = time.perf_counter() - start
        for _ in range(per_epoch):
            iterator.get_next()
        first = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(per_epoch):
            iterator.get_next()
        later = time.perf_counter() - start

        start = time.perf_counter()
        iterator = iter(datasets.get_dataset(config)[0])
        iterator.get_next()
        again = time.perf_counter() - start
        print(f"first epoch ({per_epoch} batches of {args.batch_size}, {args.image_size} px): "
              f"{first:.2f} s, of which decoding into the cache {built:.2f} s")
        print(f"later epoch: {later:.2f} s")
        print(f"second run on the unchanged folder: first batch after {again:.2f} s "
              "(cache reused)")


if __name__ == "__main__":
    main()
