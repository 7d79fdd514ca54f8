"""The FID Inception network, its preprocessing, and the uint8 rule for scored images.

The network is a Flax port of the Inception graph of 2015-12-05 that every FID number
is computed with, in the form pytorch-fid ports it (`fid_inception_v3`: torchvision's
Inception-v3 with FID-specific mixed blocks, 1008 classes, no auxiliary head). Its
variables come from `evaluation.weights`.

Preprocessing follows pytorch-fid exactly: uint8 -> float in [0, 1] -> bilinear resize
to 299x299 with PyTorch's `F.interpolate(mode='bilinear', align_corners=False)`
semantics -> scaled to [-1, 1]. Grey images (one channel) are repeated to RGB here.

`apply(variables, images)` is the pure network function (no jit, no devices), for
callers that jit and shard it themselves; `get_inception_model_from_variables` wraps it
in a jitted function of host batches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

INCEPTION_SIZE = 299
POOL_DIM = 2048
NUM_LOGITS = 1008
# Largest batch one compiled call of `get_inception_model_from_variables` takes.
DEFAULT_CHUNK_SIZE = 256

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
    `evaluation.weights.torch_state_dict_to_flax`.
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
# Preprocessing and the uint8 rule
# --------------------------------------------------------------------------------------


def images_to_uint8(images: Any) -> np.ndarray:
    """Float images in [0, 1] (any shape) -> uint8 by clip(255 x) and truncation.

    score_sde's rule for the samples it scores (`np.clip(x * 255, 0, 255)
    .astype(np.uint8)`): truncation, not rounding, so 254.9 / 255 -> 254. Every image
    that becomes uint8 for FID / IS / KID goes through here, keeping the numbers
    comparable with the paper's.
    """
    return np.clip(np.asarray(images) * 255.0, 0, 255).astype(np.uint8)


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
    """Images [B, H, W, 3 or 1] with values 0..255 (uint8, or float holding those values)
    -> float32 [B, 299, 299, 3] in [-1, 1], as pytorch-fid does (x / 255, bilinear
    resize, 2x - 1); one grey channel is repeated to RGB first."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"Inception input must be images [B, H, W, 3] or [B, H, W, 1], "
                         f"got shape {tuple(images.shape)}")
    x = images.astype(jnp.float32) / 255.0
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    x = resize_bilinear_torch(x, INCEPTION_SIZE, INCEPTION_SIZE)
    return 2.0 * x - 1.0


# --------------------------------------------------------------------------------------
# The network as functions
# --------------------------------------------------------------------------------------


def apply(variables: Any, images: jax.Array,
          precision: Any = jax.lax.Precision.HIGHEST) -> dict[str, jax.Array]:
    """Pure FID Inception forward: no jit, no device placement (jit and shard it as you
    like; `variables` are traced arguments, not constants).

    Args:
      variables: {'params', 'batch_stats'} of `FIDInceptionV3`
        (`evaluation.weights.load_inception_variables`).
      images: [B, H, W, 3] or [B, H, W, 1] with values 0..255, uint8 or float32 (cast
        here; floats must already be on the 0..255 scale: see `images_to_uint8`).
      precision: matmul/conv precision; HIGHEST keeps GPU features equal to float32
        (TF32 on recent GPUs would shift FIDs slightly).

    Returns:
      {'pool_3': [B, 2048], 'logits': [B, 1008]} float32.
    """
    return FIDInceptionV3(precision=precision).apply(variables, preprocess_images(images))


@functools.cache
def _jitted_apply(precision: Any) -> Callable:
    # One jitted function per precision, so its compile cache is shared by every
    # feature function built from it.
    return jax.jit(functools.partial(apply, precision=precision))


def _chunk_sizes(n: int, chunk_size: int) -> list[tuple[int, int]]:
    """(real, padded) sizes of the chunks a batch of n is cut into: full chunks of
    chunk_size, then the rest padded to a power of two, so only log2(chunk_size) + 1
    shapes are ever compiled whatever the batch sizes."""
    sizes = [(chunk_size, chunk_size)] * (n // chunk_size)
    rest = n % chunk_size
    if rest:
        sizes.append((rest, min(chunk_size, 1 << (rest - 1).bit_length())))
    return sizes


def get_inception_model_from_variables(
    variables: Any, precision: Any = jax.lax.Precision.HIGHEST,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Callable[[Any], dict[str, jax.Array]]:
    """`apply` with `variables` as a jitted function of host batches.

    Returns `inception_fn(images)`: uint8 images [B, H, W, 3] or [B, H, W, 1] (numpy or
    jax, any B >= 1) -> {'pool_3': [B, 2048], 'logits': [B, 1008]} float32 jax arrays on
    the default device. The variables are jit arguments, placed on the device once.
    """
    return chunked(_jitted_apply(precision), jax.device_put(variables), chunk_size)


def chunked(forward: Callable[[Any, Any], dict[str, jax.Array]], variables: Any,
            chunk_size: int = DEFAULT_CHUNK_SIZE) -> Callable[[Any], dict[str, jax.Array]]:
    """`forward(variables, images) -> {name: [B, ...]}` (jitted) as a function of uint8
    image batches of any size B: run in chunks of `chunk_size`, the rest zero-padded to
    a power of two and the padding stripped, so odd batch sizes do not recompile."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")

    def inception_fn(images: Any) -> dict[str, jax.Array]:
        images = images if isinstance(images, jax.Array) else np.asarray(images)
        if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.dtype != np.uint8:
            raise ValueError(
                f"Inception input must be uint8 images [B, H, W, 3] or [B, H, W, 1], got "
                f"{images.dtype} {tuple(images.shape)}; convert floats in [0, 1] with "
                "images_to_uint8")
        if min(images.shape) < 1:
            raise ValueError(f"empty image batch of shape {tuple(images.shape)}")
        outs, start = [], 0
        for real, padded in _chunk_sizes(images.shape[0], chunk_size):
            out = forward(variables, _pad_batch(images[start:start + real], padded))
            outs.append({k: v[:real] for k, v in out.items()} if padded > real else out)
            start += real
        if len(outs) == 1:
            return outs[0]
        return {k: jnp.concatenate([o[k] for o in outs]) for k in outs[0]}

    return inception_fn


def _pad_batch(images: Any, size: int) -> Any:
    if images.shape[0] == size:
        return images
    widths = ((0, size - images.shape[0]),) + ((0, 0),) * (images.ndim - 1)
    return (jnp.pad if isinstance(images, jax.Array) else np.pad)(images, widths)


def compute_activations(
    inception_fn: Callable[[Any], dict[str, jax.Array]],
    images: Iterable[Any],
    progress: bool = False,
    total: int | None = None,
    desc: str = "Inception",
) -> dict[str, np.ndarray]:
    """Run `inception_fn` over batches of uint8 images [B_i, H, W, C].

    Smaller batches (a ragged last one) are padded to the first batch's size so the
    network compiles once. Returns {'pool_3': [N, 2048], 'logits': [N, 1008]} float32
    numpy arrays, N = sum of B_i. `progress` shows a tqdm bar (`total` batches).
    """
    iterator = images
    if progress:
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
