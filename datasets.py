"""Input pipelines and data scalers.

`get_dataset(config, ...)` returns tf.data pipelines of dicts
`{'image': float32 in [0, 1], 'label': int32}`:

* training mode (`evaluation=False`): images `[n_jitted_steps, local_batch, H, W, C]`, labels
  `[n_jitted_steps, local_batch]`; both splits are shuffled (tf.data sources: a buffer of
  10000; array sources: a fresh permutation every epoch) and repeated forever; random
  horizontal flips (when `config.data.random_flip`) only on the train split.
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

Each data set (`config.data.dataset`) is registered with `register_dataset(name=...)`: the
registry (`DATASETS`, read-only) is the only list of valid names, and a plugin file registers
its own data sets the same way the builtins do. A registered loader returns the two splits as
arrays of uint8 HWC images and labels (`ArraySplit`; sharded over hosts here) or as tf.data
datasets of this host's examples. Builtins: CIFAR10, SVHN, CELEBA, LSUN (tfds), MNIST and
FashionMNIST (the IDX files in `config.data.data_dir` when that folder holds any, else tfds),
FFHQ and CelebAHQ (the TFRecords at `config.data.tfrecords_path`, which both splits read, as in
the reference); 'folder': a folder of the user's PNG/JPEG/WebP images or an .npz
(`config.data.data_dir`; first-level subfolders are classes; `data_folder.py`), decoded once
into a uint8 cache in `config.data.cache_dir`; 'tfds:<name>': any TFDS image data set. Data sets
without class labels yield label `NO_LABEL` (-1).
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from google.protobuf.message import DecodeError

import data_folder

# DataError, read_idx and load_images are part of this module's API; they live in data_files so
# that reading files needs no TensorFlow.
from data_files import NATIVE_SIZES, DataError, load_images, read_idx  # noqa: F401

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


def _pre_shorter_side(img: tf.Tensor, size: int) -> tf.Tensor:
    """Any size: shorter side to `size` (antialiased bicubic, clipped to [0, 1]), then the
    central square crop; none at the stored size."""
    if img.shape[0] == size and img.shape[1] == size:
        return _to_float(img)
    hw = tf.cast(tf.shape(img)[:2], tf.float32)
    new_hw = tf.maximum(tf.cast(tf.round(hw * size / tf.reduce_min(hw)), tf.int32), size)
    img = tf.image.resize(_to_float(img), new_hw, method="bicubic", antialias=True)
    return tf.clip_by_value(_central_crop(img, size), 0.0, 1.0)


# ----------------------------------------------------------------------------- the registry


@dataclasses.dataclass(frozen=True)
class LoadRequest:
    """What `get_dataset` asks of a data set's loader (its second argument).

    evaluation: the pipelines make one pass in stored order (a loader may then keep its files
      in order); download: tfds may download and prepare missing data; seed: for the loader's
      own shuffling (of files), distinct per (config.seed, host).
    """

    evaluation: bool = False
    download: bool = False
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class ArraySplit:
    """One split held in arrays: `images` uint8 [N, H, W, C] or [N, H, W] (a numpy array or a
    memmap: read in chunks of 256, never copied whole), `labels` integer [N] or None
    (unlabelled), `indices` [M] the examples that form the split (default: all N in order)."""

    images: np.ndarray
    labels: np.ndarray | None = None
    indices: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class Splits:
    """What a loader returns: the `train` and `eval` splits, each an `ArraySplit` (or a tuple
    `(images, labels)`, or an images array) read by `get_dataset`, which gives every host its
    contiguous shard, or a `tf.data.Dataset` of this host's examples `{'image': uint8 [H, W, C],
    'label': int (optional)}`; and `source`, returned as `get_dataset`'s third value (a tfds
    builder, a `FileSource`, or None)."""

    train: Any
    eval: Any
    source: Any = None


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A registered data set (`config.data.dataset == name`); see `register_dataset`."""

    name: str
    load: Callable[[Any, LoadRequest], Splits]
    channels: int | None
    native_size: tuple[int, int] | None
    preprocess: Callable[[tf.Tensor, int], tf.Tensor]
    check: Callable[[Any], None] | None = None


_REGISTRY: dict[str, DatasetSpec] = {}
# The registered data sets by name, read-only (names ending in ':' are prefixes: 'tfds:').
DATASETS = types.MappingProxyType(_REGISTRY)


def register_dataset(name: str | None = None, *, channels: int | None = None,
                     native_size: tuple[int, int] | None = None,
                     preprocess: Callable[[tf.Tensor, int], tf.Tensor] | None = None,
                     check: Callable[[Any], None] | None = None):
    """Decorator: registers `load` as the data set `config.data.dataset == name` (default:
    the function's name). The registry is the only list of valid data set names.

        @datasets.register_dataset(name="my_scans", channels=1)
        def my_scans(config, request):
            x = np.load(config.data.data_dir)["x"]             # uint8 [N, H, W, 1]
            y = np.load(config.data.data_dir)["y"]             # int [N], or None
            return datasets.Splits(train=(x[:-500], y[:-500]), eval=(x[-500:], y[-500:]))

    `load(config, request: LoadRequest) -> Splits` returns uint8 images of any size (HWC) and
    integer labels (or none: label NO_LABEL); `get_dataset` shards, shuffles, preprocesses,
    dequantizes, flips and batches them. Raise `DataError` (a bad file, named) or
    `FileNotFoundError` for problems with the data: `main.py` prints them as one line.

    channels: the images' channel count, checked against config.data.num_channels (None: the
      loader follows config.data.num_channels). native_size: (H, W) of the stored images, or
      None. preprocess: (uint8 [H, W, C], image_size S) -> float32 [S, S, C] in [0, 1], default
      an antialiased resize (a no-op at size S). check: config -> None, raising ValueError
      naming a bad config value; `run_lib.checks` runs it before anything is built.
    Registering a name again replaces it only from the same function (a plugin file imported
    twice); another function under a taken name is a ValueError.
    """

    def register(load):
        key = name or load.__name__
        old = _REGISTRY.get(key)
        if old is not None and _qualified(old.load) != _qualified(load):
            raise ValueError(f"Dataset {key!r} is already registered (by "
                             f"{_qualified(old.load)}); choose another name.")
        _REGISTRY[key] = DatasetSpec(key, load, channels, native_size,
                                     preprocess or _pre_resize, check)
        return load

    return register


def _qualified(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def valid_names() -> list[str]:
    """The valid values of config.data.dataset (a prefix 'p:' shows as 'p:<name>')."""
    return [f"{n}<name>" if n.endswith(":") else n for n in _REGISTRY]


def get_spec(name: str) -> DatasetSpec:
    """The registered data set `name` (exact, or by a registered prefix such as 'tfds:');
    ValueError listing the valid names."""
    spec = _REGISTRY.get(name)
    if spec is not None and not name.endswith(":"):
        return spec
    for key, spec in _REGISTRY.items():
        if key.endswith(":") and isinstance(name, str) and name.startswith(key) \
                and len(name) > len(key):
            return spec
    raise ValueError(f"Unknown dataset {name!r}; valid names: {', '.join(valid_names())}.")


def _get_spec(config) -> DatasetSpec:
    """The spec of `config.data.dataset`, checked against `config.data.num_channels`."""
    name = config.data.dataset
    spec = get_spec(name)
    want = config.data.get("num_channels", spec.channels)
    if spec.channels is not None and want != spec.channels:
        raise ValueError(
            f"config.data.num_channels={want} but {name} has {spec.channels} channel(s)."
        )
    return spec


def class_names(source) -> tuple[str, ...] | None:
    """The class names of a data set, from `get_dataset`'s third value (a `FileSource` of a
    labelled folder, or a tfds builder with a 'label' ClassLabel feature); None if unknown."""
    names = getattr(source, "class_names", None)
    if names:
        return tuple(names)
    try:
        label = source.info.features["label"]
        return tuple(label.names) if label.num_classes else None
    except (AttributeError, KeyError, TypeError):
        return None


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


@dataclasses.dataclass(frozen=True)
class FileSource:
    """Describes a data set read from local files (returned as `dataset_builder`):
    class_names, for a labelled folder, the classes in label order."""

    name: str
    files: dict[str, tuple[str, ...]]
    num_examples: dict[str, int] | None = None
    class_names: tuple[str, ...] | None = None
    # The training split is held in memory, so its pipeline starts at any batch at once
    # (`get_dataset(..., start_batch=k)`): its state is one number, the batches consumed.
    seekable: bool = False


def _idx_source(name: str, splits, idx_files, data_dir: str | None):
    """From the IDX files in `data_dir`; None if it holds none of them."""
    if not data_dir or not os.path.isdir(data_dir):
        return None
    names = dict(zip(splits, idx_files, strict=True))
    files = {s: [_find_idx_file(data_dir, p) for p in pair] for s, pair in names.items()}
    if all(f is None for pair in files.values() for f in pair):
        return None
    missing = [p for s in names for p, f in zip(names[s], files[s], strict=True) if f is None]
    if missing:
        raise FileNotFoundError(
            f"{name}: config.data.data_dir={data_dir!r} holds "
            f"IDX files but lacks {', '.join(m + '[.gz]' for m in missing)}."
        )
    arrays, counts = {}, {}
    for split, paths in files.items():
        images, labels = _read_idx_pair(*paths)
        arrays[split] = ArraySplit(images[:, :, :, None], labels)
        counts[split] = images.shape[0] // jax.process_count()
    source = FileSource(name, {s: tuple(f) for s, f in files.items()}, counts)
    return Splits(arrays[splits[0]], arrays[splits[1]], source)


def _tfds_name(name: str, tfds_name: str, config) -> str:
    if "{category}" not in tfds_name:
        return tfds_name
    category = config.data.get("category", None)
    valid = [c.name for c in tfds.builder_cls(tfds_name.split("/")[0]).BUILDER_CONFIGS]
    if category not in valid:
        raise ValueError(
            f"config.data.category={category!r} is not a {name} category; valid: "
            f"{', '.join(valid)}."
        )
    return tfds_name.format(category=category)


def _tfds_builder(tfds_name: str, config, request: LoadRequest):
    builder = tfds.builder(tfds_name, data_dir=config.data.get("data_dir", None) or None)
    if request.download:
        builder.download_and_prepare()
    return builder


def _tfds_splits(label: str, builder, splits, config, request: LoadRequest, obtain: str):
    """{split: this host's raw tfds examples} for the named splits."""
    options = tf.data.Options()
    options.deterministic = True
    read_config = tfds.ReadConfig(options=options, shuffle_seed=request.seed)
    raw = {}
    for split in dict.fromkeys(splits):
        host_split = split
        if jax.process_count() > 1:
            host_split = tfds.split_for_jax_process(split, drop_remainder=True)
        try:
            raw[split] = builder.as_dataset(
                split=host_split, shuffle_files=not request.evaluation, read_config=read_config
            )
        except AssertionError as e:  # tfds' way of saying the prepared files are not there.
            if "could not find data" not in str(e):
                raise
            data_dir = config.data.get("data_dir", None) or None
            raise FileNotFoundError(
                f"{label}: the TFDS data set {builder.name!r} is not prepared: looked in "
                f"{builder.data_path} (config.data.data_dir={data_dir!r}). To get it, "
                f"{obtain.format(tfds_name=builder.name)}."
            ) from None
    return raw


@dataclasses.dataclass(frozen=True)
class TfdsLoader:
    """A builtin tfds data set: `tfds_name` ('{category}' stands for config.data.category),
    `splits` (train, eval) (both may name the same split), `obtain`: how to get the data."""

    name: str
    tfds_name: str
    splits: tuple[str, str]
    obtain: str = _TFDS

    def __call__(self, config, request: LoadRequest) -> Splits:
        builder = _tfds_builder(_tfds_name(self.name, self.tfds_name, config), config, request)
        raw = _tfds_splits(self.name, builder, self.splits, config, request, self.obtain)
        return Splits(raw[self.splits[0]], raw[self.splits[1]], builder)


@dataclasses.dataclass(frozen=True)
class IdxOrTfdsLoader(TfdsLoader):
    """The IDX files `idx_files` (per split: images, labels) in config.data.data_dir when that
    folder holds any, else tfds."""

    idx_files: tuple[tuple[str, str], tuple[str, str]] = ()

    def __call__(self, config, request: LoadRequest) -> Splits:
        found = _idx_source(self.name, self.splits, self.idx_files,
                            config.data.get("data_dir", None))
        return found if found is not None else super().__call__(config, request)


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



@dataclasses.dataclass(frozen=True)
class TfrecordsLoader:
    """The TFRecords at config.data.tfrecords_path (records of the progressive GANs'
    dataset_tool), read by both splits as in the reference."""

    name: str
    channels: int = 3
    obtain: str = _TFRECORDS

    def __call__(self, config, request: LoadRequest) -> Splits:
        del request
        path = config.data.get("tfrecords_path", None)
        files = sorted(tf.io.gfile.glob(path)) if path else []
        if not files:
            raise FileNotFoundError(
                f"{self.name}: no TFRecord files at config.data.tfrecords_path={path!r}. To "
                f"get them, {self.obtain}."
            )
        # Damage shows here, while the pipeline is built, not after the first step's compile.
        shapes = {_first_record_shape(f, self.channels) for f in files}
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
            return {"image": tf.transpose(img, (1, 2, 0)),
                    "label": tf.constant(NO_LABEL, tf.int32)}

        ds = tf.data.TFRecordDataset(files)
        # Record-level sharding: host shards differ by at most one record.
        ds = ds.shard(jax.process_count(), jax.process_index())
        ds = ds.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
        return Splits(ds, ds, FileSource(self.name, {"train": tuple(files)}))


# ----------------------------------------------------------------------------- builtins

_MNIST_FILES = (
    ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
)
_TEST, _VALID, _SAME = ("train", "test"), ("train", "validation"), ("train", "train")
_FASHION_OBTAIN = (_IDX + ", e.g. `apt-get install dataset-fashion-mnist` and set "
                   "config.data.data_dir=/usr/share/datasets/fashion-mnist")

for _name, _load, _channels, _pre in (
    # name, loader, channels, preprocess; the stored (H, W) is data_files.NATIVE_SIZES'
    ("CIFAR10", TfdsLoader("CIFAR10", "cifar10", _TEST), 3, _pre_resize),
    ("SVHN", TfdsLoader("SVHN", "svhn_cropped", _TEST), 3, _pre_resize),
    ("CELEBA", TfdsLoader("CELEBA", "celeb_a", _VALID), 3, _pre_celeba),
    ("LSUN", TfdsLoader("LSUN", "lsun/{category}", _VALID), 3, _pre_lsun),
    ("FFHQ", TfrecordsLoader("FFHQ"), 3, _pre_resize),
    ("CelebAHQ", TfrecordsLoader("CelebAHQ"), 3, _pre_resize),
    ("MNIST", IdxOrTfdsLoader("MNIST", "mnist", _TEST, _IDX, _MNIST_FILES), 1, _pre_mnist),
    ("FashionMNIST", IdxOrTfdsLoader("FashionMNIST", "fashion_mnist", _TEST, _FASHION_OBTAIN,
                                     _MNIST_FILES), 1, _pre_mnist),
):
    register_dataset(_name, channels=_channels, native_size=NATIVE_SIZES.get(_name),
                     preprocess=_pre)(_load)


def default_cache_dir() -> str:
    """Where the 'folder' data set caches decoded images when config.data.cache_dir is '' and
    no workdir supplied one: $SCORE_SDE_CACHE/data, else ~/.cache/score_sde/data."""
    root = os.environ.get("SCORE_SDE_CACHE") or os.path.join(os.path.expanduser("~"),
                                                             ".cache", "score_sde")
    return os.path.join(root, "data")


def _check_folder(config) -> None:
    data = config.data
    if not data.get("data_dir", ""):
        raise ValueError("config.data.dataset='folder' reads config.data.data_dir, which is "
                         "empty; set --config.data.data_dir=<folder of images or .npz>")
    if data.num_channels not in (1, 3):
        raise ValueError(f"config.data.num_channels={data.num_channels}; the 'folder' data set "
                         "makes 1 (grey) or 3 (RGB) channels")
    fraction = data.get("eval_fraction", 0.0)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"config.data.eval_fraction={fraction} must lie in [0, 1)")
    if fraction > 0 and data.get("eval_dir", ""):
        raise ValueError(f"config.data.eval_dir={data.eval_dir!r} and eval_fraction={fraction} "
                         "both name an evaluation split; set one of them")


def _labels_in(classes: tuple[str, ...], cached, where: str) -> np.ndarray:
    """int32 labels [N] of `cached` numbered by `classes` (NO_LABEL when it is unlabelled)."""
    if not cached.classes:
        return np.full(len(cached.names), NO_LABEL, np.int32)
    unknown = [c for c in cached.classes if c not in classes]
    if unknown:
        raise DataError(f"{where}: class subfolder {unknown[0]!r} is not a class of "
                        f"config.data.data_dir (classes: {list(classes)}).")
    lookup = np.asarray([classes.index(c) for c in cached.classes], np.int32)
    return np.where(cached.class_index >= 0, lookup[np.maximum(cached.class_index, 0)],
                    NO_LABEL).astype(np.int32)


@register_dataset("folder", check=_check_folder)
def folder(config, request: LoadRequest) -> Splits:
    """A folder of the user's images or an .npz (config.data.data_dir; see data_folder.py),
    decoded once into config.data.cache_dir; the evaluation split is config.data.eval_dir,
    else the held-out config.data.eval_fraction, else the training images."""
    del request
    _check_folder(config)
    data = config.data
    size, channels = int(data.image_size), int(data.num_channels)
    cache_dir = data.get("cache_dir", "") or default_cache_dir()
    train = data_folder.cached_images(data.data_dir, size, channels, cache_dir)
    classes = train.classes
    labels = _labels_in(classes, train, data.data_dir)
    eval_dir, fraction = data.get("eval_dir", ""), float(data.get("eval_fraction", 0.0))
    if eval_dir:
        held = data_folder.cached_images(eval_dir, size, channels, cache_dir)
        train_split = ArraySplit(train.images, labels)
        eval_split = ArraySplit(held.images, _labels_in(classes, held, eval_dir))
        counts = (len(train.names), len(held.names))
    elif fraction > 0:
        train_idx, eval_idx = data_folder.holdout_split(train.names, fraction)
        if not len(eval_idx):
            raise DataError(f"{data.data_dir}: holds {len(train.names)} image(s); "
                            f"config.data.eval_fraction={fraction} needs at least 2.")
        train_split = ArraySplit(train.images, labels, train_idx)
        eval_split = ArraySplit(train.images, labels, eval_idx)
        counts = (len(train_idx), len(eval_idx))
    else:
        train_split = eval_split = ArraySplit(train.images, labels)
        counts = (len(train.names), len(train.names))
    pc = jax.process_count()
    source = FileSource("folder", {"train": (data.data_dir,), "eval": (eval_dir or data.data_dir,)},
                        {"train": counts[0] // pc, "eval": counts[1] // pc}, classes or None)
    return Splits(train_split, eval_split, source)


def _check_tfds(config) -> None:
    name = config.data.dataset[len("tfds:"):]
    family = name.split("/")[0].split(":")[0]
    try:
        tfds.builder_cls(family)
    except Exception:  # noqa: BLE001 (tfds raises its own DatasetNotFoundError, or others)
        raise ValueError(f"config.data.dataset={config.data.dataset!r}: {family!r} is not a "
                         "TFDS data set name (tfds.list_builders() lists them)") from None
    if config.data.num_channels not in (1, 3):
        raise ValueError(f"config.data.num_channels={config.data.num_channels}; TFDS images "
                         "are given 1 (grey) or 3 (RGB) channels")


@register_dataset("tfds:", preprocess=_pre_shorter_side, check=_check_tfds)
def any_tfds(config, request: LoadRequest) -> Splits:
    """Any TFDS image data set by name, `config.data.dataset='tfds:<name>'` (a builder config
    and version may follow: 'tfds:lsun/tower', 'tfds:cifar100:3.0.2'): the 'image' feature,
    converted to config.data.num_channels (luma or repeated grey; alpha dropped), shorter side
    resized and centre-cropped; 'label' when it is a scalar. Splits: 'train' and
    config.data.eval_split, by default 'test', else 'validation', else 'train'."""
    label = config.data.dataset
    builder = _tfds_builder(label[len("tfds:"):], config, request)
    features = builder.info.features
    keys = list(getattr(features, "keys", lambda: [])())
    shape = features["image"].shape if "image" in keys else None
    if shape is None or len(shape) != 3:
        raise DataError(f"{label}: expected an 'image' feature of shape [H, W, C]; the features "
                        f"are {keys}" + (f" ('image' has shape {shape})" if shape else "") + ".")
    with_label = "label" in keys and tuple(features["label"].shape) == ()
    known = set(builder.info.splits.keys())
    eval_split = config.data.get("eval_split", "") or next(
        (s for s in ("test", "validation") if s in known), "train")
    raw = _tfds_splits(label, builder, ("train", eval_split), config, request,
                       _TFDS + " (config.data.eval_split picks the evaluation split)")
    have, want = shape[-1], int(config.data.num_channels)

    def convert(example):
        img = example["image"]
        if have == 4:
            img = img[..., :3]
        if have in (3, 4) and want == 1:
            img = tf.image.rgb_to_grayscale(img)
        elif have == 1 and want == 3:
            img = tf.image.grayscale_to_rgb(img)
        out = {"image": img}
        if with_label:
            out["label"] = example["label"]
        return out

    train_ds, eval_ds = (raw[s].map(convert) for s in ("train", eval_split))
    return Splits(train_ds, eval_ds, builder)


# ----------------------------------------------------------------------------- pipeline

_ARRAY_CHUNK = 256  # examples per read from an ArraySplit


def _index_shuffle(index: np.ndarray, shuffle_seed: int):
    """p -> index[perm_e(p mod n)], e = p // n: running position p to the example it reads,
    each epoch e a fresh permutation of the n examples (a stateless index shuffle keyed by
    `shuffle_seed` and e). Any position is reached at once, so a pipeline's state is p alone
    (a shuffle buffer's state holds what it buffered)."""
    n = len(index)
    if n == 0:
        raise DataError("The training split holds no images.")
    table = tf.constant(index, tf.int64)

    def pick(p):
        seed = tf.stack([tf.constant(shuffle_seed, tf.int64), p // n])
        return tf.gather(table, tf.random.experimental.index_shuffle(
            p % n, seed, tf.constant(n - 1, tf.int64)))

    return pick


def _array_dataset(name: str, which: str, split, shuffle_seed: int | None,
                   start: int = 0) -> tf.data.Dataset:
    """This host's contiguous shard of an ArraySplit (or (images, labels) / images) as raw
    examples, read in chunks. With `shuffle_seed`: repeated, each pass in a fresh random
    order, from running position `start` on."""
    if isinstance(split, np.ndarray):
        split = ArraySplit(split)
    elif isinstance(split, tuple):
        split = ArraySplit(*split)
    images, labels = split.images, split.labels
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8
            and images.ndim in (3, 4)):
        raise DataError(f"{name}: the loader's {which} images are "
                        f"{getattr(images, 'dtype', type(images).__name__)} "
                        f"{list(getattr(images, 'shape', []))}; expected a uint8 array "
                        "[N, H, W, C] or [N, H, W].")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{name}: the loader's {which} labels are {labels.dtype} "
                            f"{list(labels.shape)}; expected integers [{len(images)}].")
        labels = labels.astype(np.int32)
    index = np.arange(len(images)) if split.indices is None \
        else np.asarray(split.indices, np.int64)
    n = len(index) // jax.process_count()
    index = index[jax.process_index() * n:(jax.process_index() + 1) * n]
    shape = images.shape[1:] if images.ndim == 4 else (*images.shape[1:], 1)

    def read(i):
        x = images[i].reshape(len(i), *shape)
        y = labels[i] if labels is not None else np.full(len(i), NO_LABEL, np.int32)
        return x, y

    def read_chunk(i):
        x, y = tf.numpy_function(read, [i], (tf.uint8, tf.int32), stateful=False)
        x.set_shape([None, *shape])
        y.set_shape([None])
        return {"image": x, "label": y}

    if shuffle_seed is None:
        ids = tf.data.Dataset.from_tensor_slices(index)
    else:
        ids = tf.data.Dataset.counter(start).map(_index_shuffle(index, shuffle_seed))
    return ids.batch(_ARRAY_CHUNK).map(read_chunk).unbatch()


def _raw_dataset(name: str, which: str, split, shuffle_seed: int | None,
                 start: int = 0) -> tf.data.Dataset:
    if isinstance(split, tf.data.Dataset):
        return split
    return _array_dataset(name, which, split, shuffle_seed, start)


def _pipeline(ds, config, spec, local_batch, *, split_id, evaluation, dequantize, stream,
              shuffled=False, start=0):
    """Shuffles and repeats (training), preprocesses, dequantizes, flips and batches a split.
    `shuffled`: the raw examples already come repeated, in a fresh random order every pass,
    from running position `start` on (arrays: `_array_dataset`), so no shuffle buffer of
    decoded images is needed."""
    seed, size = int(config.seed), int(config.data.image_size)
    channels = spec.channels or int(config.data.num_channels)
    flip = bool(config.data.random_flip) and split_id == 0 and not evaluation
    base_key = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, split_id], tf.int64), jax.process_index()
    )
    if not evaluation:
        # 10000 as in the reference; a smaller optional config.data.shuffle_buffer_size saves
        # memory at high resolution (the buffer holds decoded images).
        buffer = int(config.data.get("shuffle_buffer_size", SHUFFLE_BUFFER_SIZE))
        if not shuffled:
            ds = ds.repeat().shuffle(buffer, seed=stream + split_id)
    # A running index keys the per-example noise, so results do not depend on map parallelism.
    ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start), ds)

    def preprocess(index, d):
        img = spec.preprocess(d["image"], size)
        img.set_shape([size, size, channels])
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
      start_batch: training mode, splits held in memory (the returned `FileSource`'s
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

    request = LoadRequest(evaluation=evaluation, download=download, seed=stream)
    splits = spec.load(config, request)
    if not isinstance(splits, Splits):
        raise TypeError(f"The loader of data set {spec.name!r} returned "
                        f"{type(splits).__name__}; expected datasets.Splits.")
    n_jitted = 1 if evaluation else int(config.training.get("n_jitted_steps", 1))
    start = int(start_batch) * n_jitted * local_batch
    in_memory = not isinstance(splits.train, tf.data.Dataset)
    if start and not in_memory:
        raise ValueError(f"Data set {spec.name!r} streams its training split; it cannot start "
                         "at a given batch (start_batch).")
    train_ds, eval_ds = (
        _pipeline(_raw_dataset(spec.name, which, split, None if evaluation else stream + i,
                               start if i == 0 else 0),
                  config, spec, local_batch, split_id=i, evaluation=evaluation,
                  dequantize=uniform_dequantization, stream=stream,
                  shuffled=not isinstance(split, tf.data.Dataset),
                  start=start if i == 0 else 0)
        for i, (which, split) in enumerate((("train", splits.train), ("eval", splits.eval)))
    )
    source = splits.source
    if isinstance(source, FileSource) and in_memory:
        source = dataclasses.replace(source, seekable=True)
    return train_ds, eval_ds, source
