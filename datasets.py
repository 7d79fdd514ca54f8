"""Input pipelines and data scalers.

`get_dataset(config, ...)` returns tf.data pipelines of dicts
`{'image': float32 in [0, 1], 'label': int32}`:

* training mode (`evaluation=False`): images `[n_jitted_steps, local_batch, H, W, C]`, labels
  `[n_jitted_steps, local_batch]`; both splits are shuffled (buffer 10000) and repeated forever;
  random horizontal flips (when `config.data.random_flip`) only on the train split.
* evaluation mode (`evaluation=True`): images `[local_batch, H, W, C]`, labels `[local_batch]`;
  one pass, in the stored order, never flipped, so that an evaluation can be resumed batch by
  batch. Evaluation uses `config.eval.batch_size`.

`local_batch` is the global batch divided by `jax.process_count()`: every host reads its own,
equally sized shard of each split and feeds its devices' part of the global batch. Remainders
(the last incomplete batch, and up to `process_count - 1` examples that cannot be split evenly
over hosts) are dropped, so every host yields the same number of batches.

All randomness (shuffle order, flips, dequantization noise) is keyed by `config.seed`, the split
and the host, so a pipeline is reproducible. Nothing is downloaded unless `download=True`: a data
set that is not on disk raises one `FileNotFoundError` that says where it looked and how to get
the data.

Datasets (`config.data.dataset`):

- CIFAR10: tfds `cifar10` train / test; antialiased bilinear resize to image_size.
- SVHN: tfds `svhn_cropped` train / test; resize.
- CELEBA: tfds `celeb_a` train / validation; central crop 140, then resize.
- LSUN: tfds `lsun/<config.data.category>` train / validation. 128 px: shorter side to 128,
  then central crop; other sizes: central square crop, antialiased bicubic resize, rounded back
  to 8 bits (as the reference does).
- FFHQ, CelebAHQ: TFRecords at `config.data.tfrecords_path` (a file or glob; features `data`:
  raw uint8 CHW bytes, `shape`: [C, H, W]). Both splits read the same records, as in the
  reference. Resized only if the stored size differs from image_size.
- MNIST, FashionMNIST: IDX files in `config.data.data_dir` (`train-images-idx3-ubyte[.gz]`,
  `train-labels-idx1-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`;
  Debian's `dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist) when that
  folder holds any, else tfds `mnist` / `fashion_mnist` (train / test). 28 px is used as is;
  image_size 32 zero-pads 2 pixels on every side (the background is 0, so the image is
  unchanged and centred, not resampled); other sizes are resized.

Datasets without class labels (CELEBA, LSUN, FFHQ, CelebAHQ) yield label -1.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
from collections.abc import Callable

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

# TensorFlow only feeds data; it must never reserve accelerator memory that JAX needs.
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF's devices were already initialized by someone else.
    pass

SHUFFLE_BUFFER_SIZE = 10000
DATASETS = ("CIFAR10", "SVHN", "CELEBA", "LSUN", "FFHQ", "CelebAHQ", "MNIST", "FashionMNIST")
NO_LABEL = -1

_TFDS_NAMES = {
    "CIFAR10": "cifar10",
    "SVHN": "svhn_cropped",
    "CELEBA": "celeb_a",
    "MNIST": "mnist",
    "FashionMNIST": "fashion_mnist",
}
_TFDS_SPLITS = {
    "CIFAR10": ("train", "test"),
    "SVHN": ("train", "test"),
    "CELEBA": ("train", "validation"),
    "LSUN": ("train", "validation"),
    "MNIST": ("train", "test"),
    "FashionMNIST": ("train", "test"),
}
_CHANNELS = {
    "CIFAR10": 3,
    "SVHN": 3,
    "CELEBA": 3,
    "LSUN": 3,
    "FFHQ": 3,
    "CelebAHQ": 3,
    "MNIST": 1,
    "FashionMNIST": 1,
}
# Debian packages that install the IDX files (MNIST itself has none).
_DEBIAN_PACKAGES = {"FashionMNIST": ("dataset-fashion-mnist", "/usr/share/datasets/fashion-mnist")}
_IDX_PREFIXES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# ----------------------------------------------------------------------------- scalers


def get_data_scaler(config) -> Callable:
    """Maps data in [0, 1] to the model's range: [-1, 1] if `config.data.centered`, else [0, 1]."""
    if config.data.centered:
        return lambda x: x * 2.0 - 1.0
    return lambda x: x


def get_data_inverse_scaler(config) -> Callable:
    """Inverse of `get_data_scaler`: maps the model's range back to [0, 1]."""
    if config.data.centered:
        return lambda x: (x + 1.0) / 2.0
    return lambda x: x


# ----------------------------------------------------------------------------- IDX files

# IDX type codes (third magic byte) -> numpy dtype; multi-byte values are big-endian.
_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (plain, or gzip-compressed when the name ends in `.gz`).

    Returns the array with the shape stored in the header, e.g. images `[N, 28, 28]` uint8 or
    labels `[N]` uint8, in native byte order.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4]!r}).")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    count = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(
            f"{path}: header says shape {shape} ({count * dtype.itemsize} bytes of "
            f"data) but the file holds {len(raw) - header} bytes after the header."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _find_idx_file(data_dir: str, prefix: str) -> str | None:
    # Files are named `train-images-idx3-ubyte` by the original distribution; some mirrors use a
    # dot before `idx`.
    for stem in (prefix, prefix.replace("-idx", ".idx")):
        for name in (stem, stem + ".gz"):
            path = os.path.join(data_dir, name)
            if os.path.isfile(path):
                return path
    return None


def _idx_files(data_dir: str | None) -> dict[str, tuple[str | None, str | None]] | None:
    """{'train': (images, labels), 'test': (...)} if `data_dir` holds any IDX file, else None."""
    if not data_dir or not os.path.isdir(data_dir):
        return None
    files = {
        split: tuple(_find_idx_file(data_dir, p) for p in prefixes)
        for split, prefixes in _IDX_PREFIXES.items()
    }
    if all(f is None for pair in files.values() for f in pair):
        return None
    return files


# ----------------------------------------------------------------------------- image ops


def _to_float(img: tf.Tensor) -> tf.Tensor:
    # Exact k / 255 for uint8 input (convert_image_dtype multiplies by a rounded reciprocal).
    return tf.cast(img, tf.float32) / 255.0


def _central_crop(img: tf.Tensor, size: int | tf.Tensor) -> tf.Tensor:
    h, w = tf.shape(img)[0], tf.shape(img)[1]
    return tf.image.crop_to_bounding_box(img, (h - size) // 2, (w - size) // 2, size, size)


def _resize(img: tf.Tensor, size: int, method: str = "bilinear") -> tf.Tensor:
    """Antialiased resize of a float [H, W, C] image to [size, size, C]; a no-op at equal size."""
    if img.shape[0] == size and img.shape[1] == size:
        return img
    return tf.image.resize(img, [size, size], method=method, antialias=True)


def _resize_small(img: tf.Tensor, size: int) -> tf.Tensor:
    """Antialiased resize so that the shorter side becomes `size` (aspect ratio kept)."""
    hw = tf.cast(tf.shape(img)[:2], tf.float32)
    new_hw = tf.cast(tf.round(hw * size / tf.reduce_min(hw)), tf.int32)
    return tf.image.resize(img, new_hw, antialias=True)


def _make_resize_op(config) -> Callable[[tf.Tensor], tf.Tensor]:
    """uint8 [H, W, C] image -> float32 [S, S, C] in [0, 1], S = config.data.image_size."""
    name, size = config.data.dataset, config.data.image_size
    if name in ("CIFAR10", "SVHN", "FFHQ", "CelebAHQ"):
        return lambda img: _resize(_to_float(img), size)
    if name == "CELEBA":
        return lambda img: _resize(_central_crop(_to_float(img), 140), size)
    if name == "LSUN":
        if size == 128:
            return lambda img: _central_crop(_resize_small(_to_float(img), size), size)

        def crop_resize(img):
            # The reference quantizes the bicubic result back to 8 bits; we round and clip (bicubic
            # overshoots [0, 255]) so the data stay on the 1/255 grid that dequantization assumes.
            side = tf.reduce_min(tf.shape(img)[:2])
            img = _resize(_central_crop(tf.cast(img, tf.float32), side), size, method="bicubic")
            return _to_float(tf.cast(tf.clip_by_value(tf.round(img), 0.0, 255.0), tf.uint8))

        return crop_resize
    if name in ("MNIST", "FashionMNIST"):
        if size == 32:
            # 28 -> 32 by zero padding 2 px per side: the usual way to fit 28 px digits to the
            # power-of-two resolutions of the U-Nets without resampling them.
            return lambda img: tf.pad(_to_float(img), [[2, 2], [2, 2], [0, 0]])
        return lambda img: _resize(_to_float(img), size)
    raise AssertionError(name)  # unreachable: names are checked in get_dataset.


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class FileSource:
    """Describes a data set read from local files (returned as `dataset_builder`)."""

    name: str
    files: dict[str, tuple[str, ...]]
    num_examples: dict[str, int] | None = None


def _tfds_name(config) -> str:
    if config.data.dataset == "LSUN":
        return f"lsun/{config.data.category}"
    return _TFDS_NAMES[config.data.dataset]


def _tfds_source(config, evaluation: bool, download: bool, read_seed: int):
    """Returns (builder, {split: raw ds of this host's shard}) for a tfds data set."""
    name = _tfds_name(config)
    data_dir = config.data.get("data_dir", None) or None
    builder = tfds.builder(name, data_dir=data_dir)
    if download:
        builder.download_and_prepare()
    options = tf.data.Options()
    options.deterministic = True
    read_config = tfds.ReadConfig(options=options, shuffle_seed=read_seed)
    raw = {}
    for split in _TFDS_SPLITS[config.data.dataset]:
        host_split = split
        if jax.process_count() > 1:
            host_split = tfds.split_for_jax_process(split, drop_remainder=True)
        try:
            raw[split] = builder.as_dataset(
                split=host_split, shuffle_files=not evaluation, read_config=read_config
            )
        except AssertionError as e:  # tfds' way of saying the prepared files are not there.
            if "could not find data" not in str(e):
                raise
            extra = ""
            if config.data.dataset in _DEBIAN_PACKAGES:
                package, folder = _DEBIAN_PACKAGES[config.data.dataset]
                extra = f", or `apt-get install {package}` and set config.data.data_dir={folder}"
            raise FileNotFoundError(
                f"{config.data.dataset}: the TFDS data set {name!r} is not prepared: looked in "
                f"{builder.data_path} (config.data.data_dir={data_dir!r}). Prepare it on a machine "
                f"with internet access with `tfds build {name} --data_dir=DIR` and set "
                f"config.data.data_dir=DIR{extra}; or call get_dataset(..., download=True)."
            ) from None
    return builder, raw


def _idx_source(config, files):
    """Returns (FileSource, {split: raw ds of this host's shard}) from local IDX files."""
    missing = [
        p
        for split, prefixes in _IDX_PREFIXES.items()
        for p, f in zip(prefixes, files[split], strict=True)
        if f is None
    ]
    if missing:
        raise FileNotFoundError(
            f"{config.data.dataset}: config.data.data_dir={config.data.data_dir!r} holds "
            f"IDX files but lacks {', '.join(m + '[.gz]' for m in missing)}."
        )
    pc, pi = jax.process_count(), jax.process_index()
    raw, counts = {}, {}
    for split, (image_path, label_path) in files.items():
        images, labels = read_idx(image_path), read_idx(label_path)
        if images.ndim != 3 or labels.shape != images.shape[:1]:
            raise ValueError(
                f"{image_path}: expected images [N, H, W] and labels [N], got "
                f"{images.shape} and {labels.shape}."
            )
        # Equal contiguous shards per host (like tfds.even_splits(drop_remainder=True)).
        n = images.shape[0] // pc
        counts[split] = n
        raw[split] = tf.data.Dataset.from_tensor_slices(
            {
                "image": images[pi * n : (pi + 1) * n, :, :, None],
                "label": labels[pi * n : (pi + 1) * n],
            }
        )
    source = FileSource(config.data.dataset, {s: tuple(f) for s, f in files.items()}, counts)
    return source, raw


def _tfrecord_source(config):
    """Returns (FileSource, {split: raw ds}) from TFRecords of raw CHW uint8 images."""
    path = config.data.get("tfrecords_path", None)
    files = sorted(tf.io.gfile.glob(path)) if path else []
    if not files:
        raise FileNotFoundError(
            f"{config.data.dataset}: no TFRecord files at config.data.tfrecords_path={path!r}. "
            f"Create them with the dataset_tool of the progressive GANs / StyleGAN repositories "
            f"(records with features `data`: raw uint8 CHW bytes and `shape`: [C, H, W]) and set "
            f"config.data.tfrecords_path to the file or glob pattern."
        )

    def parse(record):
        ex = tf.io.parse_single_example(
            record,
            features={
                "shape": tf.io.FixedLenFeature([3], tf.int64),
                "data": tf.io.FixedLenFeature([], tf.string),
            },
        )
        img = tf.reshape(tf.io.decode_raw(ex["data"], tf.uint8), ex["shape"])
        return {"image": tf.transpose(img, (1, 2, 0)), "label": tf.constant(NO_LABEL, tf.int32)}

    ds = tf.data.TFRecordDataset(files)
    # Record-level sharding: host shards differ by at most one record.
    ds = ds.shard(jax.process_count(), jax.process_index())
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    source = FileSource(config.data.dataset, {"train": tuple(files)})
    return source, {"train": ds, "eval": ds}


# ----------------------------------------------------------------------------- pipeline


def _batch_sizes(config, evaluation: bool) -> int:
    """Checks the global batch size and returns this host's share of it."""
    batch_size = config.eval.batch_size if evaluation else config.training.batch_size
    key = "config.eval.batch_size" if evaluation else "config.training.batch_size"
    n_dev, n_proc = jax.device_count(), jax.process_count()
    if batch_size <= 0 or batch_size % n_dev != 0:
        raise ValueError(
            f"{key}={batch_size} must be a positive multiple of the number of devices "
            f"({n_dev}) so that every device gets a whole per-device batch."
        )
    if batch_size % n_proc != 0:
        raise ValueError(f"{key}={batch_size} must divide by the number of processes ({n_proc}).")
    return batch_size // n_proc


def get_dataset(
    config, uniform_dequantization: bool = False, evaluation: bool = False, download: bool = False
):
    """Creates the training and evaluation pipelines for `config.data.dataset`.

    Args:
      config: the experiment ConfigDict (reads `data.*` (optional `data.shuffle_buffer_size`,
        default 10000), `training.batch_size`,
        `training.n_jitted_steps`, `eval.batch_size`, `seed`).
      uniform_dequantization: add U[0, 1) noise per pixel: x <- (U + 255 x) / 256 (the caller
        passes `config.data.uniform_dequantization`, or True for likelihoods).
      evaluation: one unshuffled, unflipped pass with `config.eval.batch_size` and no
        `n_jitted_steps` dimension (see the module docstring).
      download: let tfds download and prepare a missing data set (off by default).

    Returns:
      `(train_ds, eval_ds, dataset_builder)`: two `tf.data.Dataset`s of dicts `{'image': float32
      [n_jitted_steps, B, H, W, C] (training) or [B, H, W, C] (evaluation) in [0, 1], 'label':
      int32 [n_jitted_steps, B] or [B]}` with B the per-host batch, and the tfds builder (or a
      `FileSource` for local files).
    """
    name = config.data.dataset
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASETS)}.")
    channels = _CHANNELS[name]
    want_channels = config.data.get("num_channels", channels)
    if want_channels != channels:
        raise ValueError(
            f"config.data.num_channels={want_channels} but {name} has {channels} channel(s)."
        )
    local_batch = _batch_sizes(config, evaluation)
    # 10000 as in the reference; a smaller optional config.data.shuffle_buffer_size saves memory
    # at high resolution (the buffer holds decoded images).
    shuffle_buffer = int(config.data.get("shuffle_buffer_size", SHUFFLE_BUFFER_SIZE))
    n_jitted = 1 if evaluation else int(config.training.get("n_jitted_steps", 1))
    size = int(config.data.image_size)
    seed = int(config.seed)
    host = jax.process_index()
    # Distinct, reproducible streams per (seed, host); the split is folded in below.
    stream = (seed * 1_000_003 + host * 7919) % (2**31 - 1)

    if name in ("FFHQ", "CelebAHQ"):
        builder, raw = _tfrecord_source(config)
        splits = ("train", "eval")
    elif (
        name in ("MNIST", "FashionMNIST")
        and (idx := _idx_files(config.data.get("data_dir", None))) is not None
    ):
        builder, raw = _idx_source(config, idx)
        splits = ("train", "test")
    else:
        try:
            builder, raw = _tfds_source(config, evaluation, download, stream)
        except FileNotFoundError as e:
            if name in ("MNIST", "FashionMNIST"):
                data_dir = config.data.get("data_dir", None)
                raise FileNotFoundError(
                    f"{e} (No IDX files train-images-idx3-ubyte[.gz] etc. in "
                    f"config.data.data_dir={data_dir!r} either.)"
                ) from None
            raise
        splits = _TFDS_SPLITS[name]

    resize_op = _make_resize_op(config)

    def create(ds: tf.data.Dataset, split_id: int, is_train_split: bool) -> tf.data.Dataset:
        flip = bool(config.data.random_flip) and is_train_split and not evaluation
        base_key = tf.random.experimental.stateless_fold_in(
            tf.constant([seed, split_id], tf.int64), host
        )
        if not evaluation:
            ds = ds.repeat()
            ds = ds.shuffle(shuffle_buffer, seed=stream + split_id)
        # A running index keys the per-example noise, so results do not depend on map parallelism.
        ds = tf.data.Dataset.zip(tf.data.Dataset.counter(), ds)

        def preprocess(index, d):
            img = resize_op(d["image"])
            img.set_shape([size, size, channels])
            keys = tf.random.experimental.stateless_split(
                tf.random.experimental.stateless_fold_in(base_key, index), num=2
            )
            if uniform_dequantization:
                noise = tf.random.stateless_uniform(tf.shape(img), seed=keys[0], dtype=tf.float32)
                img = (noise + img * 255.0) / 256.0
            if flip:
                img = tf.image.stateless_random_flip_left_right(img, seed=keys[1])
            label = (
                tf.cast(d["label"], tf.int32) if "label" in d else tf.constant(NO_LABEL, tf.int32)
            )
            return {"image": img, "label": label}

        ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
        ds = ds.batch(local_batch, drop_remainder=True)
        if not evaluation:
            ds = ds.batch(n_jitted, drop_remainder=True)
        options = tf.data.Options()
        options.deterministic = True
        return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

    train_ds = create(raw[splits[0]], 0, is_train_split=True)
    eval_ds = create(raw[splits[1]], 1, is_train_split=False)
    return train_ds, eval_ds, builder
