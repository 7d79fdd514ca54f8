"""Sample-quality evaluation: the FID Inception network, FID / KID / IS, stats files.

The network is a Flax port of the Inception graph of 2015-12-05 that every FID number
is computed with, in the form pytorch-fid ports it (`fid_inception_v3`: torchvision's
Inception-v3 with FID-specific mixed blocks, 1008 classes, no auxiliary head). Its
weights are pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, read here without
PyTorch by a restricted unpickler that only rebuilds tensors (no code from the file
runs).

Typical use::

    inception = get_inception_model(config.eval.inception_weights or None)
    feats = compute_activations(inception, batches_of_uint8_images, progress=True)
    ref = load_dataset_stats(config)
    fid = fid_from_activations(ref['pool_3'], feats['pool_3'])
    kid = kid_from_activations(ref['pool_3'], feats['pool_3'])
    inception_score = inception_score_from_logits(feats['logits'])

Preprocessing follows pytorch-fid exactly: uint8 -> float in [0, 1] -> bilinear resize
to 299x299 with PyTorch's `F.interpolate(mode='bilinear', align_corners=False)`
semantics -> scaled to [-1, 1].
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import logging
import os
import pickle
import struct
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import scipy.linalg
import scipy.special
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# --------------------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------------------

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# pytorch-fid (like torch.hub) names its file after the first hex digits of its SHA-256.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
WEIGHTS_CONFIG_KEY = "eval.inception_weights"
CACHE_ENV_VAR = "SCORE_SDE_CACHE"

INCEPTION_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008

_PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))

# --------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------


class BasicConv2d(nn.Module):
    """Conv (no bias) + BatchNorm (eps 1e-3, running statistics) + ReLU, NHWC.

    `padding` is symmetric (pad_h, pad_w), as in PyTorch's Conv2d.
    """

    features: int
    kernel_size: tuple[int, int]
    strides: int = 1
    padding: tuple[int, int] = (0, 0)
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ph, pw = self.padding
        x = nn.Conv(
            self.features,
            self.kernel_size,
            strides=(self.strides, self.strides),
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=self.precision,
            name="conv",
        )(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
        return nn.relu(x)


def _max_pool(x: jax.Array, stride: int, pad: int = 0) -> jax.Array:
    # Padding, where used, is -inf as in PyTorch's max_pool2d.
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
    # TF's average pool (and pytorch-fid's patch, count_include_pad=False) divides by the
    # number of real pixels in each window, not by 9.
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                       count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (FIDInceptionA): out channels 224 + pool_features."""

    pool_features: int
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(64, (1, 1), name="branch1x1")(x)
        b5 = conv(48, (1, 1), name="branch5x5_1")(x)
        b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = conv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a): out channels 384 + 96 + in."""

    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(384, (3, 3), strides=2, name="branch3x3")(x)
        bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool(x, 2)], axis=-1)


class InceptionC(nn.Module):
    """17x17 block with factorized 7x7 convolutions (FIDInceptionC): 768 out channels."""

    channels_7x7: int
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        c7 = self.channels_7x7
        b1 = conv(192, (1, 1), name="branch1x1")(x)
        b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = conv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a): out channels 320 + 192 + in."""

    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b3 = conv(192, (1, 1), name="branch3x3_1")(x)
        b3 = conv(320, (3, 3), strides=2, name="branch3x3_2")(b3)
        b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class InceptionE(nn.Module):
    """8x8 block with expanded filter banks: 2048 out channels.

    `pool='avg'` is FIDInceptionE_1 (Mixed_7b, average pool excluding padding);
    `pool='max'` is FIDInceptionE_2 (Mixed_7c): the 2015 graph max-pools here.
    """

    pool: str
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(BasicConv2d, precision=self.precision)
        b1 = conv(320, (1, 1), name="branch1x1")(x)
        b3 = conv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
        ], axis=-1)
        bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
        ], axis=-1)
        if self.pool == "avg":
            pooled = _avg_pool_3x3_same(x)
        elif self.pool == "max":
            pooled = _max_pool(x, 1, pad=1)
        else:
            raise ValueError(f"InceptionE pool must be 'avg' or 'max', got {self.pool!r}")
        bp = conv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
    """pytorch-fid's FID Inception-v3, NHWC.

    Input: float images [B, H, W, 3] already scaled to [-1, 1] (H, W >= 75; the FID
    convention is 299, see `preprocess_images`). Output: {'pool_3': [B, 2048] (global
    average pool after Mixed_7c), 'logits': [B, 1008] (fc on pool_3)}.
    Submodule and variable names mirror pytorch-fid's state-dict keys, see
    `torch_state_dict_to_flax`.
    """

    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        p = self.precision
        conv = functools.partial(BasicConv2d, precision=p)
        x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
        x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool(x, 2)
        x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool(x, 2)
        x = InceptionA(32, precision=p, name="Mixed_5b")(x)
        x = InceptionA(64, precision=p, name="Mixed_5c")(x)
        x = InceptionA(64, precision=p, name="Mixed_5d")(x)
        x = InceptionB(precision=p, name="Mixed_6a")(x)
        x = InceptionC(128, precision=p, name="Mixed_6b")(x)
        x = InceptionC(160, precision=p, name="Mixed_6c")(x)
        x = InceptionC(160, precision=p, name="Mixed_6d")(x)
        x = InceptionC(192, precision=p, name="Mixed_6e")(x)
        x = InceptionD(precision=p, name="Mixed_7a")(x)
        x = InceptionE("avg", precision=p, name="Mixed_7b")(x)
        x = InceptionE("max", precision=p, name="Mixed_7c")(x)
        pool_3 = jnp.mean(x, axis=(1, 2))
        logits = nn.Dense(NUM_LOGITS, precision=p, name="fc")(pool_3)
        return {"pool_3": pool_3, "logits": logits}


# --------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] matrix of PyTorch's bilinear, align_corners=False, 1-D weights.

    Source coordinate of output i: (i + 0.5) * in/out - 0.5, clamped below at 0; the two
    neighbours floor and floor + 1 (clamped to the last pixel) get linear weights. No
    antialiasing when downsampling, as in `F.interpolate(..., antialias=False)`.
    Coordinates follow PyTorch's float32 arithmetic: scale = float32(in / out), and
    src = scale * (i + 0.5) - 0.5 rounded once to float32 (a fused multiply-add); this
    matches torch to ~1e-7, where float64 coordinates would be off by up to ~5e-5 at a
    1024 -> 299 ratio.
    """
    f32 = np.float32
    scale = float(f32(in_size) / f32(out_size))
    # float32 scale times (i + 0.5) is exact in float64, so one rounding, as in an FMA.
    src = (scale * (np.arange(out_size) + 0.5) - 0.5).astype(f32)
    src = np.maximum(src, f32(0.0))
    lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = np.clip(src - lo.astype(f32), f32(0.0), f32(1.0))
    mat = np.zeros((out_size, in_size), np.float32)
    rows = np.arange(out_size)
    np.add.at(mat, (rows, lo), f32(1.0) - frac)
    np.add.at(mat, (rows, hi), frac)
    return mat


def resize_bilinear_torch(x: jax.Array, height: int, width: int) -> jax.Array:
    """Resize float images [B, H, W, C] like `F.interpolate(mode='bilinear',
    align_corners=False)`.

    Separable matrices (exact PyTorch weights) rather than `jax.image.resize`: the
    latter antialiases when downsampling by default (e.g. 1024 -> 299 for FFHQ), which
    pytorch-fid does not; with `antialias=False` the two agree (tested).
    """
    _, h, w, _ = x.shape
    if (h, w) == (height, width):
        return x
    mh = jnp.asarray(bilinear_resize_matrix(h, height), x.dtype)
    mw = jnp.asarray(bilinear_resize_matrix(w, width), x.dtype)
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=hi)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=hi)


def preprocess_images(images: jax.Array) -> jax.Array:
    """uint8 [B, H, W, 3] -> float32 [B, 299, 299, 3] in [-1, 1], as pytorch-fid does
    (x / 255, bilinear resize, 2x - 1)."""
    x = images.astype(jnp.float32) / 255.0
    x = resize_bilinear_torch(x, INCEPTION_SIZE, INCEPTION_SIZE)
    return 2.0 * x - 1.0


def images_to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [0, 1] -> uint8 by clip(255 x) and truncation, score_sde's
    convention for the samples it scores (keeps FIDs comparable with the paper)."""
    return np.clip(np.asarray(images) * 255.0, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Parameters: Flax tree <-> pytorch-fid state dict
# --------------------------------------------------------------------------------------

# (collection, Flax leaf name) -> PyTorch parameter / buffer name.
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


@functools.cache
def inception_variable_shapes() -> Any:
    """Abstract variables ({'params', 'batch_stats'}) of `FIDInceptionV3`, no compute
    (cached; treat as read-only)."""
    model = FIDInceptionV3()
    x = jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), x)


def _torch_key(path: tuple[Any, ...]) -> str:
    names = [getattr(k, "key", k) for k in path]
    collection, modules, leaf = names[0], names[1:-1], names[-1]
    return ".".join([*modules, _LEAF_TO_TORCH[(collection, leaf)]])


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(flax_shape)
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape[::-1] if len(shape) == 2 else shape


def _to_torch_layout(x: np.ndarray) -> np.ndarray:
    if x.ndim == 4:  # HWIO -> OIHW
        return x.transpose(3, 2, 0, 1)
    if x.ndim == 2:  # [in, out] -> [out, in]
        return x.T
    return x


def _to_flax_layout(x: np.ndarray) -> np.ndarray:
    if x.ndim == 4:  # OIHW -> HWIO
        return x.transpose(2, 3, 1, 0)
    if x.ndim == 2:
        return x.T
    return x


def torch_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """pytorch-fid state-dict key -> PyTorch shape, for every tensor the network uses
    (BatchNorm `num_batches_tracked` counters are not used and not listed)."""
    return {_torch_key(path): _torch_shape(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(inception_variable_shapes())}


def torch_state_dict_keys() -> list[str]:
    """The state-dict keys `torch_state_dict_to_flax` requires, sorted."""
    return sorted(torch_state_dict_shapes())


def torch_state_dict_to_flax(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """pytorch-fid state dict (numpy arrays, PyTorch layouts) -> Flax variables.

    Conv weights go OIHW -> HWIO, the fc weight [1008, 2048] -> [2048, 1008]; BatchNorm
    weight/bias/running_mean/running_var become params scale/bias and batch_stats
    mean/var. `*.num_batches_tracked` entries are ignored; any other missing or
    unexpected key, or a wrong shape, is an error naming it.
    """
    abstract = inception_variable_shapes()
    expected = {_torch_key(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract)}
    present = {k for k in sd if not k.endswith(".num_batches_tracked")}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise ValueError(
            "state dict does not match pytorch-fid's FID Inception: "
            f"{len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}")

    def convert(path, leaf):
        key = _torch_key(path)
        value = _to_flax_layout(np.asarray(sd[key]))
        if value.shape != tuple(leaf.shape):
            raise ValueError(f"{key}: shape {np.shape(sd[key])} does not match the expected "
                             f"{_torch_shape(leaf.shape)}")
        return np.ascontiguousarray(value, dtype=np.float32)

    return jax.tree_util.tree_map_with_path(convert, abstract)


def flax_to_torch_state_dict(variables: Any) -> dict[str, np.ndarray]:
    """Inverse of `torch_state_dict_to_flax` (without `num_batches_tracked`)."""
    return {
        _torch_key(path): np.ascontiguousarray(_to_torch_layout(np.asarray(leaf)))
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
    }


def init_random_variables(seed: int = 0) -> dict[str, Any]:
    """Random Flax variables (numpy float32) with the real layout, for tests and
    benchmarks.

    He-normal conv kernels and BatchNorm at identity statistics keep activations O(1)
    through the network, so outputs are finite and non-trivial. (numpy, not
    jax.random: eager jax would compile one kernel per distinct leaf shape.)
    """
    rng = np.random.default_rng(seed)

    def make(path, leaf):
        name = getattr(path[-1], "key", path[-1])
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape, np.float32)
                    * np.float32(np.sqrt(2.0 / fan_in)))
        fill = 1.0 if name in ("scale", "var") else 0.0
        return np.full(leaf.shape, fill, np.float32)

    return jax.tree_util.tree_map_with_path(make, inception_variable_shapes())


# --------------------------------------------------------------------------------------
# Reading and writing PyTorch checkpoint files without PyTorch
# --------------------------------------------------------------------------------------

_TORCH_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
_TORCH_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _StorageType:
    """Stand-in for a `torch.<X>Storage` class referenced by a pickle."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A flat typed buffer; `data` is filled from the archive (zip) or after the pickle
    (legacy format)."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: np.ndarray | None = None


class _TensorRef:
    """A strided view of a `_Storage`, materialized once all storages are read."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        if not isinstance(storage, _Storage):
            raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        if len(self.size) != len(self.stride) or min((*self.size, self.offset, 0)) < 0:
            raise pickle.UnpicklingError(f"bad tensor geometry size={size} stride={stride}")

    def materialize(self) -> np.ndarray:
        data = self.storage.data
        if data is None:
            raise pickle.UnpicklingError(f"storage {self.storage.key!r} has no data")
        if 0 in self.size:
            return np.zeros(self.size, data.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True))
        if any(s < 0 for s in self.stride) or last >= data.size:
            raise pickle.UnpicklingError(
                f"tensor (offset {self.offset}, size {self.size}, stride {self.stride}) "
                f"reads past its storage of {data.size} elements")
        view = np.lib.stride_tricks.as_strided(
            data[self.offset:], shape=self.size,
            strides=tuple(s * data.itemsize for s in self.stride), writeable=False)
        return np.array(view)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
    # Signature of torch._utils._rebuild_tensor(_v2): trailing requires_grad,
    # backward_hooks and metadata carry nothing a state dict needs.
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
    return data


def _allowed_global(module: str, name: str) -> Any:
    # Fresh objects per lookup, so a hostile BUILD opcode cannot alter shared state.
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
        return functools.partial(_rebuild_tensor)
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
        return functools.partial(_rebuild_parameter)
    if module == "torch" and name in _STORAGE_DTYPES:
        return _StorageType(name)
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that knows only tensors, storages and OrderedDict; any other global
    is refused, so no code from the file runs."""

    def __init__(self, file, storages: dict[str, _Storage], legacy: bool):
        super().__init__(file, encoding="utf-8")
        self._storages = storages
        self._legacy = legacy

    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed_global(module, name)
        if obj is None:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': only tensor data "
                "(torch._utils._rebuild_tensor_v2, torch.*Storage, collections.OrderedDict) "
                "is allowed in a weights file")
        return obj

    def persistent_load(self, pid: Any) -> _Storage:
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        typename = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if typename != "storage" or len(pid) != (6 if self._legacy else 5):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        storage_type, key, _location, numel = pid[1:5]
        if self._legacy and pid[5] is not None:
            raise pickle.UnpicklingError("storage views (pre-1.0 PyTorch files) are unsupported")
        if not isinstance(storage_type, _StorageType) or not isinstance(numel, int) or numel < 0:
            raise pickle.UnpicklingError(f"bad storage record {pid!r}")
        key = str(key)
        if key not in self._storages:
            self._storages[key] = _Storage(key, storage_type.dtype, numel)
        storage = self._storages[key]
        if storage.dtype != storage_type.dtype:
            raise pickle.UnpicklingError(f"storage {key!r} is used with two dtypes")
        return storage


def _materialize(obj: Any) -> dict[str, np.ndarray]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (a mapping), found {type(obj).__name__}")
    out = {}
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, _TensorRef):
            raise ValueError(f"state dict entry {key!r} is not a tensor")
        out[key] = value.materialize()
    return out


def _from_bytes(raw: bytes, storage: _Storage, swap: bool) -> np.ndarray:
    data = np.frombuffer(raw, storage.dtype, storage.numel).copy()
    return data.byteswap() if swap else data


def _load_zip(path: str) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path}: not a PyTorch zip checkpoint (no single */data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"
        if prefix + "byteorder" in zf.namelist():
            byteorder = zf.read(prefix + "byteorder").decode("ascii")
        storages: dict[str, _Storage] = {}
        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pickles[0])), storages, legacy=False).load()
        for key, storage in storages.items():
            raw = zf.read(f"{prefix}data/{key}")
            expected = storage.numel * storage.dtype.itemsize
            if len(raw) < expected:
                raise ValueError(f"{path}: storage {key} has {len(raw)} bytes, "
                                 f"expected {expected}")
            storage.data = _from_bytes(raw, storage, swap=byteorder != sys.byteorder)
    return _materialize(obj)


def _load_legacy(path: str) -> dict[str, np.ndarray]:
    storages: dict[str, _Storage] = {}
    with open(path, "rb") as f:
        def load():
            return _RestrictedUnpickler(f, storages, legacy=True).load()

        if load() != _TORCH_MAGIC_NUMBER:
            raise ValueError(f"{path}: not a PyTorch checkpoint (bad magic number)")
        if load() != _TORCH_LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unsupported legacy PyTorch protocol version")
        sys_info = load()
        if not isinstance(sys_info, dict) or not sys_info.get("little_endian", False):
            raise ValueError(f"{path}: only little-endian legacy PyTorch files are supported")
        obj = load()
        keys = load()
        if not isinstance(keys, list) or set(map(str, keys)) != set(storages):
            raise ValueError(f"{path}: storage key list does not match the pickle")
        for key in keys:
            storage = storages[str(key)]
            (numel,) = struct.unpack("<q", f.read(8))
            if numel != storage.numel:
                raise ValueError(f"{path}: storage {key} holds {numel} elements, "
                                 f"expected {storage.numel}")
            raw = f.read(numel * storage.dtype.itemsize)
            if len(raw) != numel * storage.dtype.itemsize:
                raise ValueError(f"{path}: file ends inside storage {key}")
            storage.data = _from_bytes(raw, storage, swap=sys.byteorder != "little")
    return _materialize(obj)


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a `torch.save`d state dict (zip or legacy format) into numpy arrays.

    Does not import torch. Only tensors (any strides/offsets, 0-dim included) of the
    standard dtypes in a (nested-free) mapping are accepted; any other global in the
    pickle raises `pickle.UnpicklingError` naming it.
    """
    path = os.fspath(path)
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    return _load_legacy(path)


class _GlobalRef:
    """A global (module, name) written into a pickle without importing the module."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle insists that reduce callables are callable
        raise TypeError("placeholder for a PyTorch global")


class _StorageToPickle:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array

    def little_endian_bytes(self) -> bytes:
        return (self.array if sys.byteorder == "little" else self.array.byteswap()).tobytes()


class _TensorToPickle:
    def __init__(self, storage: _StorageToPickle):
        self.storage = storage

    def __reduce__(self):
        array = self.storage.array
        strides = tuple(s // array.itemsize for s in array.strides)
        args = (self.storage, 0, array.shape, strides, False, collections.OrderedDict())
        return _GlobalRef("torch._utils", "_rebuild_tensor_v2"), args


class _TorchPickler(pickle._Pickler):  # the pure-Python pickler lets us emit raw GLOBALs
    def __init__(self, file, legacy: bool):
        super().__init__(file, protocol=2)
        self._legacy = legacy

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _GlobalRef):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("ascii"))
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if not isinstance(obj, _StorageToPickle):
            return None
        name = next(k for k, v in _STORAGE_DTYPES.items() if v == obj.array.dtype)
        pid = ("storage", _GlobalRef("torch", name), obj.key, "cpu", obj.array.size)
        return (*pid, None) if self._legacy else pid  # legacy adds view_metadata


def save_torch_state_dict(path: str | os.PathLike, sd: Mapping[str, np.ndarray],
                          legacy: bool = False) -> None:
    """Write numpy arrays as a `torch.save`-compatible state dict, without torch.

    `legacy=False` writes the zip format of PyTorch >= 1.6, `legacy=True` the older
    stream format (`_use_new_zipfile_serialization=False`); both load with
    `load_torch_state_dict` and `torch.load(weights_only=True)`. The file is written
    to a temporary name and renamed into place.
    """
    path = os.fspath(path)
    storages, tensors = [], collections.OrderedDict()
    for i, (key, value) in enumerate(sd.items()):
        array = np.asarray(value, order="C")  # (ascontiguousarray would make 0-d 1-d)
        if array.dtype not in _STORAGE_DTYPES.values():
            raise ValueError(f"{key}: dtype {array.dtype} has no PyTorch storage type")
        storages.append(_StorageToPickle(str(i), array))
        tensors[key] = _TensorToPickle(storages[-1])
    buf = io.BytesIO()
    _TorchPickler(buf, legacy).dump(tensors)

    tmp = path + ".tmp"
    if legacy:
        sys_info = {"protocol_version": _TORCH_LEGACY_PROTOCOL, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 4}}
        with open(tmp, "wb") as f:
            for header in (_TORCH_MAGIC_NUMBER, _TORCH_LEGACY_PROTOCOL, sys_info):
                pickle.dump(header, f, protocol=2)
            f.write(buf.getvalue())
            pickle.dump([s.key for s in storages], f, protocol=2)
            for s in storages:  # each storage: int64 element count, then raw bytes
                f.write(struct.pack("<q", s.array.size))
                f.write(s.little_endian_bytes())
    else:
        prefix = "archive/"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            zf.writestr(prefix + "data.pkl", buf.getvalue())
            zf.writestr(prefix + "byteorder", "little")
            for s in storages:
                zf.writestr(f"{prefix}data/{s.key}", s.little_endian_bytes())
            zf.writestr(prefix + "version", "3\n")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------
# Weights file: cache and download
# --------------------------------------------------------------------------------------


def default_cache_dir() -> str:
    """$SCORE_SDE_CACHE, else ~/.cache/score_sde."""
    return os.environ.get(CACHE_ENV_VAR) or os.path.join(
        os.path.expanduser("~"), ".cache", "score_sde")


def download_inception_weights(cache_dir: str | None = None) -> str:
    """Path of pytorch-fid's weights in the cache, downloading them on first use.

    The download goes to a temporary file in the cache directory, must have a SHA-256
    starting with 6726825d, and is then renamed into place, so an interrupted or
    corrupt download never leaves a file that looks valid.
    """
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, FID_WEIGHTS_FILENAME)
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    logging.getLogger(__name__).info("Downloading %s to %s", FID_WEIGHTS_URL, path)
    fd, tmp = tempfile.mkstemp(prefix=FID_WEIGHTS_FILENAME + ".", suffix=".part", dir=cache_dir)
    try:
        sha = hashlib.sha256()
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(FID_WEIGHTS_URL, timeout=60) as response:
                    while chunk := response.read(1 << 20):
                        sha.update(chunk)
                        f.write(chunk)
            except (urllib.error.URLError, OSError) as err:
                # The weights are missing and cannot be fetched: a missing input file.
                raise FileNotFoundError(
                    f"Could not download the FID Inception weights from {FID_WEIGHTS_URL} "
                    f"({err}). Download that file by hand and either place it at {path} "
                    f"or pass its path with --config.{WEIGHTS_CONFIG_KEY}=/path/to/"
                    f"{FID_WEIGHTS_FILENAME}.") from None
        digest = sha.hexdigest()
        if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
            raise RuntimeError(
                f"Downloaded {FID_WEIGHTS_URL} has SHA-256 {digest}, expected a digest "
                f"starting with {FID_WEIGHTS_SHA256_PREFIX}; not saved to {path}.")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_inception_variables(weights_path: str | None = None) -> dict[str, Any]:
    """Flax variables of the FID Inception from a pytorch-fid `.pth` file (None: the
    cache, downloading on first use)."""
    if not weights_path:  # None or an empty config value
        weights_path = download_inception_weights()
    elif not os.path.exists(weights_path):
        raise FileNotFoundError(
            f"{WEIGHTS_CONFIG_KEY}={weights_path!r} does not exist; give the path of "
            f"{FID_WEIGHTS_FILENAME} ({FID_WEIGHTS_URL}) or leave it empty to use the cache "
            f"at {os.path.join(default_cache_dir(), FID_WEIGHTS_FILENAME)}.")
    return torch_state_dict_to_flax(load_torch_state_dict(weights_path))


# --------------------------------------------------------------------------------------
# Data-parallel feature extraction
# --------------------------------------------------------------------------------------


def _forward(variables: Any, images: jax.Array, precision: Any) -> dict[str, jax.Array]:
    return FIDInceptionV3(precision=precision).apply(variables, preprocess_images(images))


@functools.cache
def _inception_forward(precision: Any) -> Callable:
    # One function object per precision, so the jit cache below is hit across calls.
    return functools.partial(_forward, precision=precision)


@functools.cache
def _jit_data_parallel(forward: Callable, devices: tuple) -> tuple[Callable, NamedSharding]:
    mesh = Mesh(np.asarray(devices), ("batch",))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch = NamedSharding(mesh, PartitionSpec("batch"))
    fn = jax.jit(forward, in_shardings=(replicated, batch), out_shardings=batch)
    return fn, replicated


def data_parallel(forward: Callable[[Any, Any], dict[str, jax.Array]], variables: Any
                  ) -> Callable[[Any], dict[str, jax.Array]]:
    """Wrap `forward(variables, images) -> dict of [B, ...]` as a jitted function of
    uint8 images [B, H, W, 3] that runs batch-sharded over a 1-axis mesh of this
    process's devices with `variables` replicated; B need not divide the device count
    (the batch is zero-padded and the padding stripped from the outputs)."""
    # The process's own devices: each host scores its own images (its shard of the
    # samples) and the caller gathers activations, as score_sde's evaluation does.
    devices = tuple(jax.local_devices())
    fn, replicated = _jit_data_parallel(forward, devices)
    variables = jax.device_put(variables, replicated)
    n_dev = len(devices)

    def apply(images: Any) -> dict[str, jax.Array]:
        if not isinstance(images, jax.Array):
            images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"Inception input must be uint8 images [B, H, W, 3], got {images.dtype} "
                f"{tuple(images.shape)}; convert floats in [0, 1] with images_to_uint8")
        if min(images.shape) < 1:
            raise ValueError(f"empty image batch of shape {tuple(images.shape)}")
        b = images.shape[0]
        pad = (-b) % n_dev
        if pad:
            images = _pad_batch(images, b + pad)
        out = fn(variables, images)
        return {k: v[:b] for k, v in out.items()} if pad else out

    return apply


def _pad_batch(images: Any, size: int) -> Any:
    widths = ((0, size - images.shape[0]),) + ((0, 0),) * (images.ndim - 1)
    return (jnp.pad if isinstance(images, jax.Array) else np.pad)(images, widths)


def get_inception_model_from_variables(
    variables: Any, precision: Any = jax.lax.Precision.HIGHEST,
) -> Callable[[Any], dict[str, jax.Array]]:
    """Inception feature function for given Flax variables; see `get_inception_model`."""
    return data_parallel(_inception_forward(precision), variables)


def get_inception_model(
    weights_path: str | None = None, variables: Any = None,
    precision: Any = jax.lax.Precision.HIGHEST,
) -> Callable[[Any], dict[str, jax.Array]]:
    """The FID Inception as a jitted, data-parallel function.

    Args:
      weights_path: a local pytorch-fid `pt_inception-2015-12-05-6726825d.pth`; None or
        '': the cache ($SCORE_SDE_CACHE or ~/.cache/score_sde), downloading on first use.
      variables: Flax variables to use instead of any file (e.g. `init_random_variables`).
      precision: matmul/conv precision; HIGHEST keeps GPU features equal to float32
        (TF32 on recent GPUs would shift FIDs slightly).

    Returns:
      `inception_fn(images)`, images uint8 [B, H, W, 3] (numpy or jax; any B: a batch that
      does not divide the local device count is padded and the padding stripped) ->
      {'pool_3': [B, 2048], 'logits': [B, 1008]} float32 jax arrays, batch sharded over
      a 1-axis mesh of the local devices, parameters replicated.
    """
    if variables is None:
        variables = load_inception_variables(weights_path)
    return get_inception_model_from_variables(variables, precision=precision)


def compute_activations(
    inception_fn: Callable[[Any], dict[str, jax.Array]],
    images: Iterable[Any],
    progress: bool = False,
    total: int | None = None,
    desc: str = "Inception",
) -> dict[str, np.ndarray]:
    """Run `inception_fn` over batches of uint8 images [B_i, H, W, 3].

    Smaller batches (a ragged last one) are padded to the first batch's size so the
    network compiles once. Returns {'pool_3': [N, 2048], 'logits': [N, 1008]} float32
    numpy arrays, N = sum of B_i. `progress` shows a tqdm bar (`total` batches).
    """
    iterator = images
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(images, total=total, desc=desc, unit="batch")
    outputs: dict[str, list[np.ndarray]] = {"pool_3": [], "logits": []}
    pending = None
    batch_size = None
    for batch in iterator:
        n = batch.shape[0]
        batch_size = batch_size or n
        if n < batch_size:
            batch = _pad_batch(batch if isinstance(batch, jax.Array) else np.asarray(batch),
                               batch_size)
        out = inception_fn(batch)
        # Fetch the previous batch only now, so the device works while we copy.
        if pending is not None:
            _append(outputs, *pending)
        pending = (out, n)
    if pending is not None:
        _append(outputs, *pending)
    if not outputs["pool_3"]:
        return {"pool_3": np.zeros((0, POOL_DIM), np.float32),
                "logits": np.zeros((0, NUM_LOGITS), np.float32)}
    return {k: np.concatenate(v) for k, v in outputs.items()}


def _append(outputs: dict[str, list[np.ndarray]], out: dict[str, jax.Array], n: int) -> None:
    for k in outputs:
        outputs[k].append(np.asarray(out[k])[:n])


# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def _as_2d_float64(a: Any, name: str) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be [N, D] activations, got shape {a.shape}")
    return a


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fid_from_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), float64.

    Tr((S1 S2)^{1/2}) is computed as the nuclear norm of S1^{1/2} S2^{1/2} (its
    singular values are the square roots of the eigenvalues of S1^{1/2} S2 S1^{1/2},
    which is similar to S1 S2). Unlike `scipy.linalg.sqrtm(S1 @ S2)` this stays real
    and accurate for the rank-deficient covariances of N < D samples.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"inconsistent FID statistics shapes {mu1.shape}, {s1.shape}, "
                         f"{mu2.shape}, {s2.shape}")
    tr_covmean = scipy.linalg.svdvals(_psd_sqrt(s1) @ _psd_sqrt(s2)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def activation_stats(a: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of activations [N, D]."""
    a = _as_2d_float64(a, "activations")
    if a.shape[0] < 2:
        raise ValueError(f"need at least 2 activations for a covariance, got {a.shape[0]}")
    return a.mean(axis=0), np.cov(a, rowvar=False)


def fid_from_activations(a: Any, b: Any) -> float:
    """FID between activation sets a [N, D] and b [M, D] (e.g. pool_3, D = 2048)."""
    return fid_from_stats(*activation_stats(a), *activation_stats(b))


def kid_and_std_from_activations(a: Any, b: Any,
                                 max_block_size: int = 1024) -> tuple[float, float]:
    """KID and its standard error, TF-GAN's block estimator.

    The sets are split into n_blocks = ceil(max(N, M) / max_block_size) consecutive
    blocks of near-equal size (the last N mod n_blocks blocks one larger); each block
    gives the unbiased MMD^2 with kernel k(x, y) = (x.y / D + 1)^3; KID is their mean and
    the error is their std / sqrt(n_blocks) (nan for a single block).
    """
    a, b = _as_2d_float64(a, "a"), _as_2d_float64(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"activation widths differ: {a.shape[1]} vs {b.shape[1]}")
    n_a, n_b = a.shape[0], b.shape[0]
    n_blocks = int(np.ceil(max(n_a, n_b) / max_block_size))

    def bounds(n: int) -> np.ndarray:
        v, n_plus = n // n_blocks, n % n_blocks
        sizes = [v] * (n_blocks - n_plus) + [v + 1] * n_plus
        if min(sizes) < 2:
            raise ValueError(f"KID needs at least 2 activations per block; {n} activations "
                             f"in {n_blocks} blocks")
        return np.concatenate([[0], np.cumsum(sizes)])

    ia, ib = bounds(n_a), bounds(n_b)
    dim = a.shape[1]
    estimates = []
    for i in range(n_blocks):
        x, y = a[ia[i]:ia[i + 1]], b[ib[i]:ib[i + 1]]
        m, n = len(x), len(y)
        k_xx = (x @ x.T / dim + 1) ** 3
        k_yy = (y @ y.T / dim + 1) ** 3
        k_xy = (x @ y.T / dim + 1) ** 3
        estimates.append((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
                         + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                         - 2 * k_xy.mean())
    estimates = np.asarray(estimates)
    mean = estimates.mean()
    std = (np.sqrt(((estimates - mean) ** 2).sum() / (n_blocks - 1) / n_blocks)
           if n_blocks > 1 else float("nan"))
    return float(mean), float(std)


def kid_from_activations(a: Any, b: Any, max_block_size: int = 1024) -> float:
    """Kernel Inception Distance (TF-GAN's block estimator), see
    `kid_and_std_from_activations`."""
    return kid_and_std_from_activations(a, b, max_block_size)[0]


def inception_score_from_logits(logits: Any) -> float:
    """IS = exp(mean_x KL(p(y|x) || p(y))), p(y|x) = softmax(logits [N, 1008]), p(y) its
    mean over the set (TF-GAN's classifier_score_from_logits: one split)."""
    logits = _as_2d_float64(logits, "logits")
    log_p = scipy.special.log_softmax(logits, axis=1)
    p = np.exp(log_p)
    p_y = p.mean(axis=0)
    # A class no image uses has p(y) = 0 and p(y|x) = 0: its KL terms are 0, not nan.
    log_py = np.log(np.where(p_y > 0, p_y, 1.0))
    kl = (p * (log_p - log_py)).sum(axis=1)
    return float(np.exp(kl.mean()))


# --------------------------------------------------------------------------------------
# Stats files
# --------------------------------------------------------------------------------------


# Resolutions at which a dataset's statistics file carries no size in its name.
_NATIVE_SIZE = {"CIFAR10": 32, "SVHN": 32, "CELEBA": 64, "MNIST": 28, "FashionMNIST": 28}


def dataset_stats_path(config: Any) -> str:
    """Where `--mode=fid_stats` writes, and evaluation reads, the dataset's statistics.

    `<config.eval.stats_dir>/<dataset>[_<category>][_<image_size>]_stats.npz`, with the
    dataset name lower-cased, the LSUN category included, and the image size included
    unless it is the dataset's native one (cifar10_stats.npz, lsun_church_outdoor_256_...).
    A relative stats_dir is taken from the project root.
    """
    stats_dir = config.eval.get("stats_dir", "") or os.path.join("assets", "stats")
    if not os.path.isabs(stats_dir):
        stats_dir = os.path.join(_PROJECT_ROOT, stats_dir)
    name = config.data.dataset.lower()
    if config.data.dataset == "LSUN":
        name += f"_{config.data.category}"
    if _NATIVE_SIZE.get(config.data.dataset) != config.data.image_size:
        name += f"_{config.data.image_size}"
    return os.path.join(stats_dir, f"{name}_stats.npz")


def save_stats(path: str | os.PathLike, pool_3: Any, logits: Any = None) -> None:
    """Write a stats `.npz` with 'pool_3' [N, 2048] (and 'logits' [N, 1008] if given),
    atomically."""
    path = os.fspath(path)
    arrays = {"pool_3": np.asarray(pool_3, np.float32)}
    if logits is not None:
        arrays["logits"] = np.asarray(logits, np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_dataset_stats(config: Any) -> dict[str, np.ndarray]:
    """Reference activations of the dataset: {'pool_3': [N, 2048], ('logits')}."""
    path = dataset_stats_path(config)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No dataset statistics at {path}. Compute them with "
            "`python main.py --mode=fid_stats --config=<your config> --workdir=<dir>` (or "
            "set config.eval.stats_dir).")
    with np.load(path) as data:
        if "pool_3" not in data:
            raise ValueError(f"{path} has no 'pool_3' array (keys: {sorted(data.keys())})")
        return {k: data[k] for k in data.keys()}
