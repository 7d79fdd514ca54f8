"""Input pipelines and data scalers.

`get_dataset(config, ...)` returns tf.data pipelines of dicts
`{'image': float32 in [0, 1], 'label': int32}`:

* training mode (`evaluation=False`): images `[n_jitted_steps, local_batch, H, W, C]`, labels
  `[n_jitted_steps, local_batch]`; both splits are shuffled (buffer 10000) and repeated forever;
  random horizontal flips (when `config.data.random_flip`) only on the train split. Splits held
  in memory (IDX files) are instead permuted afresh each epoch by a stateless index shuffle, so
  that the pipeline can start at any batch (`start_batch`) and its position is its state.
* evaluation mode (`evaluation=True`): images `[local_batch, H, W, C]`, labels `[local_batch]`;
  one pass, in the stored order, never flipped, so that an evaluation can be resumed batch by
  batch. Evaluation uses `config.eval.batch_size`.

`local_batch` is the global batch divided by `jax.process_count()` (`check_batch_size`): every
host reads its own, equally sized shard of each split and feeds its devices' part of the global
batch. Remainders (the last incomplete batch, and up to `process_count - 1` examples that cannot
be split evenly over hosts) are dropped, so every host yields the same number of batches.

All randomness (shuffle order, flips, dequantization noise) is keyed by `config.seed`, the split
and the host, so a pipeline is reproducible. tfds data sets are downloaded and prepared only when
`config.data.download=True` (or `get_dataset(..., download=True)`); otherwise a data set that is
not on disk raises one `FileNotFoundError` that says where it looked and how to get the data.
A damaged or wrong data file raises one `DataError` naming it while the pipeline is built.

Each data set (`config.data.dataset`) is one `DatasetSpec` in `DATASETS`: its source (tfds; for
MNIST and FashionMNIST the IDX files in `config.data.data_dir` when that folder holds any, else
tfds; for FFHQ and CelebAHQ the TFRecords at `config.data.tfrecords_path`, which both splits
read, as in the reference), tfds name and splits, channels, preprocessing (see the `_pre_*`
functions) and how to obtain it. Data sets without class labels yield label `NO_LABEL` (-1).
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
from collections.abc import Callable

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from google.protobuf.message import DecodeError

# DataError, read_idx and load_images are part of this module's API; they live in data_files so
# that reading files needs no TensorFlow.
from data_files import DataError, load_images, read_idx  # noqa: F401

# TensorFlow only feeds data here, but its first op would claim nearly all memory of every GPU
# it sees, starving JAX. Hiding the GPUs must happen before TF initializes its devices; doing it
# at import covers every entry point that reads data (training, evaluation, sampling, tools).
try:
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # TF's devices were initialized before this import; nothing to undo then.
    pass

SHUFFLE_BUFFER_SIZE = 10000
NO_LABEL = -1


# ----------------------------------------------------------------------------- scalers, batch


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


def check_batch_size(key: str, batch_size: int) -> int:
    """Checks the global batch size `config.<key>` and returns this host's share of it.

    It must be a positive multiple of `jax.device_count()` (every device gets a whole batch) and
    of `jax.process_count()` (every host reads an equal share); else ValueError.
    """
    n_dev, n_proc = jax.device_count(), jax.process_count()
    is_int = isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool)
    if not (is_int and batch_size > 0 and batch_size % n_dev == 0 and batch_size % n_proc == 0):
        raise ValueError(
            f"config.{key}={batch_size!r} must be a positive multiple of the device count "
            f"{n_dev} (and of the process count {n_proc})"
        )
    return int(batch_size) // n_proc


# ----------------------------------------------------------------------------- preprocessing
# Each `_pre_*` maps a uint8 [H, W, C] image to float32 [S, S, C] in [0, 1] for image_size S.


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


def _pre_resize(img: tf.Tensor, size: int) -> tf.Tensor:
    """Antialiased bilinear resize (none at the stored size)."""
    return _resize(_to_float(img), size)


def _pre_celeba(img: tf.Tensor, size: int) -> tf.Tensor:
    """Central 140 x 140 crop, then resize."""
    return _resize(_central_crop(_to_float(img), 140), size)


def _pre_lsun(img: tf.Tensor, size: int) -> tf.Tensor:
    """128 px: shorter side to 128, then central crop; else central square crop, antialiased
    bicubic resize, rounded back to 8 bits (as the reference does)."""
    if size == 128:
        hw = tf.cast(tf.shape(img)[:2], tf.float32)
        new_hw = tf.cast(tf.round(hw * size / tf.reduce_min(hw)), tf.int32)
        return _central_crop(tf.image.resize(_to_float(img), new_hw, antialias=True), size)
    # Rounding and clipping (bicubic overshoots [0, 255]) keeps the data on the 1/255 grid that
    # dequantization assumes.
    side = tf.reduce_min(tf.shape(img)[:2])
    img = _resize(_central_crop(tf.cast(img, tf.float32), side), size, method="bicubic")
    return _to_float(tf.cast(tf.clip_by_value(tf.round(img), 0.0, 255.0), tf.uint8))


def _pre_mnist(img: tf.Tensor, size: int) -> tf.Tensor:
    """28 px as is; 32 px: zero padding of 2 px per side (the background is 0, so the digit is
    centred, not resampled: the usual fit to the U-Nets' power-of-two sizes); else resize."""
    if size == 32:
        return tf.pad(_to_float(img), [[2, 2], [2, 2], [0, 0]])
    return _pre_resize(img, size)


# ----------------------------------------------------------------------------- data set specs


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """Everything the pipeline knows about one data set (`config.data.dataset == name`).

    source: 'tfds'; 'idx_or_tfds' (the IDX files `idx_files` in config.data.data_dir when that
      folder holds any, else tfds); or 'tfrecords' (config.data.tfrecords_path).
    tfds_name: '{category}' stands for config.data.category; None for TFRecords.
    splits: (train, eval) split names; both may name the same split.
    native_size: (H, W) of the stored images; None where it varies.
    preprocess: (uint8 [H, W, C], image_size S) -> float32 [S, S, C] in [0, 1].
    obtain: how to get the data, for the FileNotFoundError ('{tfds_name}' is filled in).
    idx_files: per split in `splits`, the (images, labels) IDX file names.
    """

    name: str
    source: str
    tfds_name: str | None
    splits: tuple[str, str]
    channels: int
    native_size: tuple[int, int] | None
    preprocess: Callable[[tf.Tensor, int], tf.Tensor]
    obtain: str
    idx_files: tuple[tuple[str, str], tuple[str, str]] | None = None


_TFDS = (
    "prepare it on a machine with internet access with `tfds build {tfds_name} --data_dir=DIR` "
    "and set config.data.data_dir=DIR, or let tfds download it on first use with "
    "--config.data.download=True"
)
_IDX = _TFDS + "; or put the IDX files train-images-idx3-ubyte[.gz] etc. in config.data.data_dir"
_TFRECORDS = (
    "create them with the dataset_tool of the progressive GANs / StyleGAN repositories (records "
    "with features `data`: raw uint8 CHW bytes and `shape`: [C, H, W]) and set "
    "config.data.tfrecords_path to the file or glob pattern"
)
_MNIST_FILES = (
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)
_TEST, _VALID, _SAME = ("train", "test"), ("train", "validation"), ("train", "train")

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        # name, source, tfds name, splits, channels, native (H, W), preprocess, obtain
        DatasetSpec("CIFAR10", "tfds", "cifar10", _TEST, 3, (32, 32), _pre_resize, _TFDS),
        DatasetSpec("SVHN", "tfds", "svhn_cropped", _TEST, 3, (32, 32), _pre_resize, _TFDS),
        DatasetSpec("CELEBA", "tfds", "celeb_a", _VALID, 3, (218, 178), _pre_celeba, _TFDS),
        DatasetSpec("LSUN", "tfds", "lsun/{category}", _VALID, 3, None, _pre_lsun, _TFDS),
        DatasetSpec("FFHQ", "tfrecords", None, _SAME, 3, None, _pre_resize, _TFRECORDS),
        DatasetSpec("CelebAHQ", "tfrecords", None, _SAME, 3, None, _pre_resize, _TFRECORDS),
        DatasetSpec(
            "MNIST", "idx_or_tfds", "mnist", _TEST, 1, (28, 28), _pre_mnist, _IDX, _MNIST_FILES
        ),
        DatasetSpec(
            "FashionMNIST", "idx_or_tfds", "fashion_mnist", _TEST, 1, (28, 28), _pre_mnist,
            _IDX + ", e.g. `apt-get install dataset-fashion-mnist` and set "
            "config.data.data_dir=/usr/share/datasets/fashion-mnist",
            _MNIST_FILES,
        ),
    )
}


def _get_spec(config) -> DatasetSpec:
    """The spec of `config.data.dataset`, checked against `config.data.num_channels`."""
    name = config.data.dataset
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(DATASETS)}.")
    spec = DATASETS[name]
    want = config.data.get("num_channels", spec.channels)
    if want != spec.channels:
        raise ValueError(
            f"config.data.num_channels={want} but {name} has {spec.channels} channel(s)."
        )
    return spec


# ----------------------------------------------------------------------------- IDX files


def _find_idx_file(data_dir: str, prefix: str) -> str | None:
    # Files are named `train-images-idx3-ubyte` by the original distribution; some mirrors use a
    # dot before `idx`.
    for stem in (prefix, prefix.replace("-idx", ".idx")):
        for name in (stem, stem + ".gz"):
            path = os.path.join(data_dir, name)
            if os.path.isfile(path):
                return path
    return None


def _read_idx_pair(image_path: str, label_path: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, H, W] and labels [N], checked against each other."""
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{image_path}: expected uint8 images [N, H, W], got {images.dtype} "
            f"{list(images.shape)}."
        )
    if labels.ndim != 1:
        raise DataError(f"{label_path}: expected labels [N], got shape {list(labels.shape)}.")
    if len(labels) != len(images):
        raise DataError(
            f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels."
        )
    return images, labels


# ----------------------------------------------------------------------------- sources
# Each returns (dataset_builder, {split: raw ds of this host's shard of uint8 [H, W, C] images}).


@dataclasses.dataclass(frozen=True)
class FileSource:
    """Describes a data set read from local files (returned as `dataset_builder`)."""

    name: str
    files: dict[str, tuple[str, ...]]
    num_examples: dict[str, int] | None = None
    # The splits are held in memory, so the training pipeline starts at any batch at once
    # (`get_dataset(..., start_batch=k)`): its state is one number, the batches consumed.
    seekable: bool = False


def _idx_source(spec: DatasetSpec, data_dir: str | None):
    """From the IDX files in `data_dir`; None if it holds none of them."""
    if not data_dir or not os.path.isdir(data_dir):
        return None
    names = dict(zip(spec.splits, spec.idx_files, strict=True))
    files = {s: [_find_idx_file(data_dir, p) for p in pair] for s, pair in names.items()}
    if all(f is None for pair in files.values() for f in pair):
        return None
    missing = [p for s in names for p, f in zip(names[s], files[s], strict=True) if f is None]
    if missing:
        raise FileNotFoundError(
            f"{spec.name}: config.data.data_dir={data_dir!r} holds "
            f"IDX files but lacks {', '.join(m + '[.gz]' for m in missing)}."
        )
    pc, pi = jax.process_count(), jax.process_index()
    raw, counts = {}, {}
    for split, paths in files.items():
        images, labels = _read_idx_pair(*paths)
        # Equal contiguous shards per host (like tfds.even_splits(drop_remainder=True)).
        n = counts[split] = images.shape[0] // pc
        shard = slice(pi * n, (pi + 1) * n)
        raw[split] = {"image": images[shard, :, :, None], "label": labels[shard]}
    return FileSource(spec.name, {s: tuple(f) for s, f in files.items()}, counts, True), raw


def _tfds_name(spec: DatasetSpec, config) -> str:
    if "{category}" not in spec.tfds_name:
        return spec.tfds_name
    category = config.data.get("category", None)
    valid = [c.name for c in tfds.builder_cls(spec.tfds_name.split("/")[0]).BUILDER_CONFIGS]
    if category not in valid:
        raise ValueError(
            f"config.data.category={category!r} is not a {spec.name} category; valid: "
            f"{', '.join(valid)}."
        )
    return spec.tfds_name.format(category=category)


def _tfds_source(spec: DatasetSpec, config, evaluation: bool, download: bool, read_seed: int):
    name = _tfds_name(spec, config)
    data_dir = config.data.get("data_dir", None) or None
    builder = tfds.builder(name, data_dir=data_dir)
    if download:
        builder.download_and_prepare()
    options = tf.data.Options()
    options.deterministic = True
    read_config = tfds.ReadConfig(options=options, shuffle_seed=read_seed)
    raw = {}
    for split in dict.fromkeys(spec.splits):
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
            raise FileNotFoundError(
                f"{spec.name}: the TFDS data set {name!r} is not prepared: looked in "
                f"{builder.data_path} (config.data.data_dir={data_dir!r}). To get it, "
                f"{spec.obtain.format(tfds_name=name)}."
            ) from None
    return builder, raw


def _first_record_shape(path: str, channels: int) -> tuple[int, int, int]:
    """Reads the first record of a TFRecord file now; its [C, H, W], or DataError."""
    try:
        first = next(iter(tf.data.TFRecordDataset(path).take(1)), None)
    except tf.errors.OpError as e:
        reason = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", e.message).strip()  # drop TF's op names
        raise DataError(f"{path}: cannot be read as TFRecords ({reason}).") from None
    if first is None:
        raise DataError(f"{path}: holds no records.")
    try:
        feature = tf.train.Example.FromString(first.numpy()).features.feature
    except DecodeError:
        raise DataError(f"{path}: its first record is not a tf.train.Example.") from None
    missing = [k for k in ("data", "shape") if k not in feature]
    if missing:
        raise DataError(
            f"{path}: records lack the feature(s) {missing} (have {sorted(feature)}); "
            f"expected `data` (raw uint8 CHW bytes) and `shape` ([C, H, W] int64)."
        )
    shape = tuple(feature["shape"].int64_list.value)
    data = feature["data"].bytes_list.value
    n_bytes = len(data[0]) if len(data) == 1 else -1
    if len(shape) != 3 or n_bytes != np.prod(shape):
        raise DataError(
            f"{path}: the first record's `shape` {list(shape)} does not match its `data` "
            f"({n_bytes} bytes); expected [C, H, W] with C*H*W bytes."
        )
    if shape[0] != channels:
        raise DataError(
            f"{path}: images of shape [C, H, W] = {list(shape)} have {shape[0]} channel(s); "
            f"expected {channels}."
        )
    return shape


def _tfrecord_source(spec: DatasetSpec, config):
    path = config.data.get("tfrecords_path", None)
    files = sorted(tf.io.gfile.glob(path)) if path else []
    if not files:
        raise FileNotFoundError(
            f"{spec.name}: no TFRecord files at config.data.tfrecords_path={path!r}. To get "
            f"them, {spec.obtain}."
        )
    # Damage shows here, while the pipeline is built, not after the first step's compile.
    shapes = {_first_record_shape(f, spec.channels) for f in files}
    static_shape = shapes.pop() if len(shapes) == 1 else None
    features = {
        "shape": tf.io.FixedLenFeature([3], tf.int64),
        "data": tf.io.FixedLenFeature([], tf.string),
    }

    def parse(record):
        ex = tf.io.parse_single_example(record, features=features)
        img = tf.reshape(tf.io.decode_raw(ex["data"], tf.uint8), ex["shape"])
        if static_shape is not None:  # lets the preprocessing skip a resize to the same size
            img = tf.ensure_shape(img, static_shape)
        return {"image": tf.transpose(img, (1, 2, 0)), "label": tf.constant(NO_LABEL, tf.int32)}

    ds = tf.data.TFRecordDataset(files)
    # Record-level sharding: host shards differ by at most one record.
    ds = ds.shard(jax.process_count(), jax.process_index())
    ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    return FileSource(spec.name, {"train": tuple(files)}), {"train": ds}


# ----------------------------------------------------------------------------- pipeline


def _shuffled_in_memory(arrays: dict, shuffle_seed: int, start: int) -> tf.data.Dataset:
    """(running index p, example) from p = `start` on, of a split held in memory, repeated:
    epoch p // n is a permutation of the n examples, a stateless index shuffle keyed by
    `shuffle_seed` and the epoch. Any position is reached at once, so the pipeline's state is
    p alone (a shuffle buffer's state holds its buffered examples: MBs per checkpoint)."""
    n = len(arrays["image"])
    if n == 0:
        raise DataError("The training split holds no images.")
    tensors = {k: tf.constant(v) for k, v in arrays.items()}

    def example(p):
        seed = tf.stack([tf.constant(shuffle_seed, tf.int64), p // n])
        i = tf.random.experimental.index_shuffle(p % n, seed, tf.constant(n - 1, tf.int64))
        return p, {k: tf.gather(t, i) for k, t in tensors.items()}

    return tf.data.Dataset.counter(start).map(example)


def _pipeline(ds, config, spec, local_batch, *, split_id, evaluation, dequantize, stream,
              start=0):
    """Shuffles and repeats (training), preprocesses, dequantizes, flips and batches a split.
    `ds` is a tf.data.Dataset, or a dict of arrays (a split held in memory), whose training
    pipeline starts at example `start`."""
    seed, size = int(config.seed), int(config.data.image_size)
    flip = bool(config.data.random_flip) and split_id == 0 and not evaluation
    base_key = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, split_id], tf.int64), jax.process_index()
    )
    if isinstance(ds, dict) and not evaluation:
        ds = _shuffled_in_memory(ds, stream + split_id, start)
    else:
        if isinstance(ds, dict):
            ds = tf.data.Dataset.from_tensor_slices(ds)
        if not evaluation:
            # 10000 as in the reference; a smaller optional config.data.shuffle_buffer_size
            # saves memory at high resolution (the buffer holds decoded images).
            buffer = int(config.data.get("shuffle_buffer_size", SHUFFLE_BUFFER_SIZE))
            ds = ds.repeat().shuffle(buffer, seed=stream + split_id)
        # A running index keys the per-example noise, so results do not depend on map
        # parallelism.
        ds = tf.data.Dataset.zip(tf.data.Dataset.counter(), ds)

    def preprocess(index, d):
        img = spec.preprocess(d["image"], size)
        img.set_shape([size, size, spec.channels])
        keys = tf.random.experimental.stateless_split(
            tf.random.experimental.stateless_fold_in(base_key, index), num=2
        )
        if dequantize:
            noise = tf.random.stateless_uniform(tf.shape(img), seed=keys[0], dtype=tf.float32)
            img = (noise + img * 255.0) / 256.0
        if flip:
            img = tf.image.stateless_random_flip_left_right(img, seed=keys[1])
        label = tf.cast(d["label"], tf.int32) if "label" in d else tf.constant(NO_LABEL, tf.int32)
        return {"image": img, "label": label}

    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(local_batch, drop_remainder=True)
    if not evaluation:
        ds = ds.batch(int(config.training.get("n_jitted_steps", 1)), drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def get_dataset(
    config, uniform_dequantization: bool = False, evaluation: bool = False, download: bool = False,
    start_batch: int = 0,
):
    """Creates the training and evaluation pipelines for `config.data.dataset`.

    Args:
      config: the experiment ConfigDict (reads `data.*` (optional `data.shuffle_buffer_size`,
        default 10000, and `data.download`, default False), `training.batch_size`,
        `training.n_jitted_steps`, `eval.batch_size`, `seed`).
      uniform_dequantization: add U[0, 1) noise per pixel: x <- (U + 255 x) / 256 (the caller
        passes `config.data.uniform_dequantization`, or True for likelihoods).
      evaluation: one unshuffled, unflipped pass with `config.eval.batch_size` and no
        `n_jitted_steps` dimension (see the module docstring).
      download: let tfds download and prepare a missing data set, as `config.data.download`
        does (either switch enables it; both are off by default).
      start_batch: training mode, sources that are held in memory (the returned source's
        `seekable`): the training pipeline starts after this many batches, exactly as the
        uninterrupted pipeline continues there.

    Returns:
      `(train_ds, eval_ds, dataset_builder)`: two `tf.data.Dataset`s of dicts `{'image': float32
      [n_jitted_steps, B, H, W, C] (training) or [B, H, W, C] (evaluation) in [0, 1], 'label':
      int32 [n_jitted_steps, B] or [B]}` with B the per-host batch, and the tfds builder (or a
      `FileSource` for local files).
    """
    spec = _get_spec(config)
    if evaluation:
        local_batch = check_batch_size("eval.batch_size", config.eval.batch_size)
    else:
        local_batch = check_batch_size("training.batch_size", config.training.batch_size)
    download = download or bool(config.data.get("download", False))
    # Distinct, reproducible streams per (seed, host); the split is folded in later.
    stream = (int(config.seed) * 1_000_003 + jax.process_index() * 7919) % (2**31 - 1)

    source = None
    if spec.source == "tfrecords":
        source = _tfrecord_source(spec, config)
    elif spec.source == "idx_or_tfds":
        source = _idx_source(spec, config.data.get("data_dir", None))
    builder, raw = source or _tfds_source(spec, config, evaluation, download, stream)
    n_jitted = 1 if evaluation else int(config.training.get("n_jitted_steps", 1))
    train_ds, eval_ds = (
        _pipeline(raw[split], config, spec, local_batch, split_id=i, evaluation=evaluation,
                  dequantize=uniform_dequantization, stream=stream,
                  start=int(start_batch) * n_jitted * local_batch if i == 0 else 0)
        for i, split in enumerate(spec.splits)
    )
    return train_ds, eval_ds, builder
