"""Shared building blocks of the score networks (DDPM, NCSN++ and the NCSN RefineNets).

Initializers follow the reference implementation (score_sde), so parameter counts and the
statistics at initialization match: DDPM-style convolutions use
`variance_scaling(scale, 'fan_avg', 'uniform')` with zero biases, NCSN-style convolutions use
PyTorch's default-like `variance_scaling(scale / 3, 'fan_in', 'uniform')` for kernel and bias.
A scale of 0 is replaced by 1e-10, as in the reference: such layers (the last conv of every
residual branch and of the network) start at ~0, so blocks start near the identity, yet
their kernels are not exactly zero.

All tensors are NHWC.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import normalization
from models import precision as precision_lib


def _nonzero(scale: float) -> float:
    return 1e-10 if scale == 0 else scale


def default_init(scale: float = 1.0):
    """The DDPM / NCSN++ initializer: variance_scaling(scale, 'fan_avg', 'uniform')."""
    return nn.initializers.variance_scaling(_nonzero(scale), "fan_avg", "uniform")


def get_act(nonlinearity: str):
    """The activation function named `nonlinearity` (elu, relu, lrelu, swish)."""
    name = nonlinearity.lower()
    acts = {
        "elu": nn.elu,
        "relu": nn.relu,
        "lrelu": functools.partial(nn.leaky_relu, negative_slope=0.2),
        "swish": nn.swish,
    }
    if name not in acts:
        raise ValueError(f"Unknown nonlinearity {name!r}; valid names: {sorted(acts)}.")
    return acts[name]


# ---------------------------------------------------------------------------------------
# Convolution helpers. They create an nn.Conv inside the caller's compact method, so they
# must be called from within a `@nn.compact` __call__.
# ---------------------------------------------------------------------------------------


def ncsn_conv1x1(x, out_planes: int, stride: int = 1, bias: bool = True, dilation: int = 1,
                 init_scale: float = 1.0):
    """1x1 convolution with NCSN's initialization (kernel and bias ~ U, fan_in / 3)."""
    return _ncsn_conv(x, out_planes, 1, stride, bias, dilation, init_scale)


def ncsn_conv3x3(x, out_planes: int, stride: int = 1, bias: bool = True, dilation: int = 1,
                 init_scale: float = 1.0):
    """3x3 'SAME' convolution with NCSN's initialization (kernel and bias ~ U, fan_in / 3)."""
    return _ncsn_conv(x, out_planes, 3, stride, bias, dilation, init_scale)


def _ncsn_conv(x, out_planes, ksize, stride, bias, dilation, init_scale):
    kernel_init = nn.initializers.variance_scaling(_nonzero(init_scale) / 3, "fan_in",
                                                   "uniform")
    kernel_shape = (ksize, ksize, x.shape[-1], out_planes)

    # PyTorch's default bias init draws from the same range as the kernel (1/sqrt(fan_in)).
    def bias_init(key, shape, dtype=jnp.float32):
        return kernel_init(key, kernel_shape, dtype)[0, 0, 0, :]

    return nn.Conv(out_planes, kernel_size=(ksize, ksize), strides=(stride, stride),
                   padding="SAME", use_bias=bias, kernel_dilation=(dilation, dilation),
                   kernel_init=kernel_init, bias_init=bias_init)(x)


def ddpm_conv1x1(x, out_planes: int, stride: int = 1, bias: bool = True, dilation: int = 1,
                 init_scale: float = 1.0, precision: str = "float32"):
    """1x1 convolution with DDPM's initialization (default_init kernel, zero bias)."""
    return nn.Conv(out_planes, kernel_size=(1, 1), strides=(stride, stride), padding="SAME",
                   use_bias=bias, kernel_dilation=(dilation, dilation),
                   kernel_init=default_init(init_scale), bias_init=nn.initializers.zeros,
                   conv_general_dilated_cls=functools.partial(ConvProduct,
                                                              precision=precision))(x)


def ddpm_conv3x3(x, out_planes: int, stride: int = 1, bias: bool = True, dilation: int = 1,
                 init_scale: float = 1.0, precision: str = "float32"):
    """3x3 'SAME' convolution with DDPM's initialization (default_init kernel, zero bias).

    `precision` is the products' precision (models.precision); results are float32.
    """
    return nn.Conv(out_planes, kernel_size=(3, 3), strides=(stride, stride), padding="SAME",
                   use_bias=bias, kernel_dilation=(dilation, dilation),
                   kernel_init=default_init(init_scale), bias_init=nn.initializers.zeros,
                   conv_general_dilated_cls=functools.partial(ConvProduct,
                                                              precision=precision))(x)


conv1x1 = ddpm_conv1x1
conv3x3 = ddpm_conv3x3


class ConvProduct(nn.Module):
    """The product of `nn.Conv` (its `conv_general_dilated_cls`): `lax.conv_general_dilated`
    with operands in `precision` (models.precision). No parameters; a module of its own so
    that a backend can replace the formulation of its gradient (backend/cpu.py)."""

    precision: str = "float32"

    def __call__(self, lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                 dimension_numbers=None, feature_group_count=1, **kwargs):
        return precision_lib.conv_fn(self.precision)(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, **kwargs)


class ChannelDense(nn.Module):
    """x [..., C] @ w [C, D] + b [D] -> [..., D], products in `precision`: a per-pixel dense
    layer over the channel axis (NIN, the attention projections). No parameters."""

    precision: str = "float32"

    def __call__(self, x, w, b):
        return precision_lib.einsum("...c,cd->...d", x, w, self.precision) + b


class ResidualSum(nn.Module):
    """x + h, divided by sqrt(2) when `skip_rescale` (a sum of two unit-variance branches
    keeps unit variance). No parameters."""

    skip_rescale: bool = True

    def __call__(self, x, h):
        return (x + h) / np.sqrt(2.0) if self.skip_rescale else x + h


class Dropout(nn.Module):
    """Inverted dropout with drop probability exactly `rate` (as `flax.linen.Dropout`); the
    identity when deterministic or rate 0."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"Dropout rate {self.rate!r} is outside [0, 1) "
                             "(config.model.dropout).")
        if deterministic or self.rate == 0.0:
            return x
        return self.drop(x)

    def drop(self, x):
        """x with each element zeroed with probability `rate`, the others divided by
        1 - rate; one key from the 'dropout' stream."""
        keep_prob = 1.0 - self.rate
        keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, x.shape)
        return jnp.where(keep, x / keep_prob, 0.0).astype(x.dtype)


# ---------------------------------------------------------------------------------------
# DDPM building blocks (Ho et al. 2020), used by DDPM and, modified, by NCSN++.
# ---------------------------------------------------------------------------------------


def get_timestep_embedding(timesteps, embedding_dim: int, max_positions: int = 10000):
    """Transformer-style sinusoidal embedding of (possibly fractional) timesteps.

    Args:
      timesteps: [B] float or int.
      embedding_dim: output width D; odd D gets one zero column appended.

    Returns:
      [B, D] float32: [sin(t f_0..f_{h-1}), cos(t f_0..f_{h-1})], f_j = max_positions^(-j/(h-1)).
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D [B], got shape {timesteps.shape}.")
    half_dim = embedding_dim // 2
    emb = math.log(max_positions) / (half_dim - 1)
    emb = jnp.exp(jnp.arange(half_dim, dtype=jnp.float32) * -emb)
    emb = timesteps.astype(jnp.float32)[:, None] * emb[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, [[0, 0], [0, 1]])
    return emb


class NIN(nn.Module):
    """Network-in-network: a per-pixel dense layer over the channel axis.

    Parameters W [C_in, num_units] (default_init(init_scale)) and b [num_units] (zeros).
    The product (`ChannelDense`) runs in `precision`.
    """

    num_units: int
    init_scale: float = 0.1
    precision: str = "float32"

    @nn.compact
    def __call__(self, x):
        w = self.param("W", default_init(self.init_scale), (x.shape[-1], self.num_units))
        b = self.param("b", nn.initializers.zeros, (self.num_units,))
        return ChannelDense(self.precision)(x, w, b)


def spatial_self_attention(q, k, v, precision: str = "float32"):
    """Single-head dot-product attention over all H * W positions.

    q, k, v: [B, H, W, C]. Returns [B, H, W, C]. Logits are scaled by C^-1/2; the two
    products run in `precision`, the softmax in float32.
    """
    b, h, w, c = q.shape
    q, k, v = (t.reshape(b, h * w, c) for t in (q, k, v))
    logits = precision_lib.einsum("bic,bjc->bij", q, k, precision) * (c ** -0.5)
    attn = jax.nn.softmax(logits, axis=-1)
    return precision_lib.einsum("bij,bjc->bic", attn, v, precision).reshape(b, h, w, c)


class AttnBlock(nn.Module):
    """DDPM's residual self-attention block: x + NIN(attn(GroupNorm(x))). Shapes [B,H,W,C]."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        h = normalization.GroupNorm(num_groups=32, epsilon=1e-6)(x)
        q = NIN(c)(h)
        k = NIN(c)(h)
        v = NIN(c)(h)
        h = spatial_self_attention(q, k, v)
        h = NIN(c, init_scale=0.0)(h)
        return x + h


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv. [B,H,W,C]->2H,2W."""

    with_conv: bool = False

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
        x = x.reshape(b, 2 * h, 2 * w, c)
        if self.with_conv:
            x = ddpm_conv3x3(x, c)
        return x


class Downsample(nn.Module):
    """2x downsampling by a stride-2 3x3 conv or 2x2 average pooling. [B,H,W,C]->H/2,W/2."""

    with_conv: bool = False

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if self.with_conv:
            # 'SAME' with stride 2 on even sizes pads (0, 1), as the reference's explicit pad.
            x = ddpm_conv3x3(x, c, stride=2)
        else:
            x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding="SAME")
        return x


class ResnetBlockDDPM(nn.Module):
    """DDPM's residual block with time-embedding bias and dropout.

    x [B, H, W, C_in], temb [B, D] or None -> [B, H, W, out_ch]. The last conv is
    zero-initialized (scale 1e-10), so the block starts as the (projected) identity.
    """

    act: Any
    out_ch: int | None = None
    conv_shortcut: bool = False
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x, temb=None, train: bool = True):
        c = x.shape[-1]
        out_ch = self.out_ch if self.out_ch else c
        h = self.act(normalization.GroupNorm(num_groups=32, epsilon=1e-6)(x))
        h = ddpm_conv3x3(h, out_ch)
        if temb is not None:
            h = h + nn.Dense(out_ch, kernel_init=default_init())(self.act(temb))[:, None, None, :]
        h = self.act(normalization.GroupNorm(num_groups=32, epsilon=1e-6)(h))
        h = Dropout(self.dropout)(h, deterministic=not train)
        h = ddpm_conv3x3(h, out_ch, init_scale=0.0)
        if c != out_ch:
            x = ddpm_conv3x3(x, out_ch) if self.conv_shortcut else NIN(out_ch)(x)
        return x + h


# ---- RefineNet blocks (NCSN / NCSNv2) below; maintained separately ----
#
# RefineNet blocks of NCSN (Song & Ermon 2019) and NCSNv2 (Song & Ermon 2020), after the
# reference's JAX port. "Cond" blocks are noise-conditional (NCSN v1): every normalization
# takes integer noise-level indices y [B]. `normalizer` / `normalization` arguments are
# zero-argument factories from models.normalization.get_normalization: `normalizer()(x)`
# or, conditional, `normalizer()(x, y)`. The unconditional NCSNv2 refine path has no
# normalization at all, as in the reference.

_RESIZE_METHODS = {"bilinear": "bilinear", "nearest_neighbor": "nearest"}


def _resize(x, shape, interpolation: str):
    """Resizes x [B, H, W, C] to [B, *shape, C]."""
    if interpolation not in _RESIZE_METHODS:
        raise ValueError(f"Unknown interpolation {interpolation!r}; valid names: "
                         f"{sorted(_RESIZE_METHODS)}.")
    return jax.image.resize(x, (x.shape[0], *shape, x.shape[-1]), _RESIZE_METHODS[interpolation])


def _mean_pool2(x):
    """2x2 average pooling with stride 2 of x [B, H, W, C] (H, W even)."""
    return (x[:, ::2, ::2] + x[:, 1::2, ::2] + x[:, ::2, 1::2] + x[:, 1::2, 1::2]) / 4.0


def _identity(x):
    return x


def _rcu(x, features, n_blocks, n_stages, act, norm):
    # Residual conv units: n_blocks residual blocks of n_stages [norm ->] act -> conv.
    for _ in range(n_blocks):
        residual = x
        for _ in range(n_stages):
            x = ncsn_conv3x3(act(norm(x)), features, bias=False)
        x = x + residual
    return x


def _crp(x, features, n_stages, act, pool, norm):
    # Chained residual pooling: each stage pools the previous stage's output (5x5, stride 1)
    # and adds its convolution to the running sum.
    x = act(x)
    path = x
    for _ in range(n_stages):
        path = pool(norm(path), window_shape=(5, 5), strides=(1, 1), padding="SAME")
        path = ncsn_conv3x3(path, features, bias=False)
        x = x + path
    return x


def _msf(xs, shape, features, interpolation, norm):
    # Multi-resolution fusion: convolve every input to `features` channels, resize to `shape`
    # and sum.
    return sum(_resize(ncsn_conv3x3(norm(h), features, bias=True), shape, interpolation)
               for h in xs)


class RCUBlock(nn.Module):
    """Residual conv units of RefineNet (NCSNv2): x [B, H, W, features] -> same shape."""

    features: int
    n_blocks: int
    n_stages: int
    act: Any = nn.relu

    @nn.compact
    def __call__(self, x):
        return _rcu(x, self.features, self.n_blocks, self.n_stages, self.act, _identity)


class CondRCUBlock(nn.Module):
    """Noise-conditional RCUBlock (NCSN v1): (x [B, H, W, features], y [B]) -> x's shape."""

    features: int
    n_blocks: int
    n_stages: int
    normalizer: Any
    act: Any = nn.relu

    @nn.compact
    def __call__(self, x, y):
        norm = lambda h: self.normalizer()(h, y)
        return _rcu(x, self.features, self.n_blocks, self.n_stages, self.act, norm)


class CRPBlock(nn.Module):
    """Chained residual pooling (NCSNv2; max pooling): x [B, H, W, features] -> same shape."""

    features: int
    n_stages: int
    act: Any = nn.relu
    maxpool: bool = True

    @nn.compact
    def __call__(self, x):
        pool = nn.max_pool if self.maxpool else nn.avg_pool
        return _crp(x, self.features, self.n_stages, self.act, pool, _identity)


class CondCRPBlock(nn.Module):
    """Noise-conditional CRPBlock (NCSN v1; average pooling): (x, y [B]) -> x's shape."""

    features: int
    n_stages: int
    normalizer: Any
    act: Any = nn.relu

    @nn.compact
    def __call__(self, x, y):
        norm = lambda h: self.normalizer()(h, y)
        return _crp(x, self.features, self.n_stages, self.act, nn.avg_pool, norm)


class MSFBlock(nn.Module):
    """Multi-resolution fusion (NCSNv2): list of [B, H_i, W_i, C_i] -> [B, *shape, features]."""

    shape: Any
    features: int
    interpolation: str = "bilinear"

    @nn.compact
    def __call__(self, xs):
        return _msf(xs, tuple(self.shape), self.features, self.interpolation, _identity)


class CondMSFBlock(nn.Module):
    """Noise-conditional MSFBlock (NCSN v1): (xs, y [B]) -> [B, *shape, features]."""

    shape: Any
    features: int
    normalizer: Any
    interpolation: str = "bilinear"

    @nn.compact
    def __call__(self, xs, y):
        norm = lambda h: self.normalizer()(h, y)
        return _msf(xs, tuple(self.shape), self.features, self.interpolation, norm)


class RefineBlock(nn.Module):
    """RefineNet block (NCSNv2): adapts each input with RCUs, fuses them (MSF) at
    `output_shape`, then CRP and output RCUs (3 units for the last block, else 1).

    xs: list of [B, H_i, W_i, C_i] (one input if `start`) -> [B, *output_shape, features].
    """

    output_shape: Any
    features: int
    act: Any = nn.relu
    interpolation: str = "bilinear"
    start: bool = False
    end: bool = False

    @nn.compact
    def __call__(self, xs):
        hs = [RCUBlock(h.shape[-1], n_blocks=2, n_stages=2, act=self.act)(h) for h in xs]
        if self.start:
            h = hs[0]
        else:
            h = MSFBlock(self.output_shape, self.features, self.interpolation)(hs)
        h = CRPBlock(self.features, n_stages=2, act=self.act)(h)
        return RCUBlock(self.features, n_blocks=3 if self.end else 1, n_stages=2,
                        act=self.act)(h)


class CondRefineBlock(nn.Module):
    """Noise-conditional RefineBlock (NCSN v1): (xs, y [B]) -> [B, *output_shape, features]."""

    output_shape: Any
    features: int
    normalizer: Any
    act: Any = nn.relu
    interpolation: str = "bilinear"
    start: bool = False
    end: bool = False

    @nn.compact
    def __call__(self, xs, y):
        hs = [CondRCUBlock(h.shape[-1], n_blocks=2, n_stages=2, normalizer=self.normalizer,
                           act=self.act)(h, y) for h in xs]
        if self.start:
            h = hs[0]
        else:
            h = CondMSFBlock(self.output_shape, self.features, normalizer=self.normalizer,
                             interpolation=self.interpolation)(hs, y)
        h = CondCRPBlock(self.features, n_stages=2, normalizer=self.normalizer,
                         act=self.act)(h, y)
        return CondRCUBlock(self.features, n_blocks=3 if self.end else 1, n_stages=2,
                            normalizer=self.normalizer, act=self.act)(h, y)


class ConvMeanPool(nn.Module):
    """'SAME' convolution followed by 2x2 mean pooling: [B, H, W, C] -> [B, H/2, W/2, out]."""

    output_dim: int
    kernel_size: int = 3
    biases: bool = True

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        x = nn.Conv(self.output_dim, kernel_size=(k, k), padding="SAME", use_bias=self.biases)(x)
        return _mean_pool2(x)


class MeanPoolConv(nn.Module):
    """2x2 mean pooling followed by a 'SAME' convolution: [B, H, W, C] -> [B, H/2, W/2, out]."""

    output_dim: int
    kernel_size: int = 3
    biases: bool = True

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        return nn.Conv(self.output_dim, kernel_size=(k, k), padding="SAME",
                       use_bias=self.biases)(_mean_pool2(x))


def _residual(x, output_dim, resample, act, dilation, norm):
    # Pre-activation residual block of the NCSN backbones. resample='down' halves the
    # resolution with mean pooling when dilation == 1; with dilation > 1 it keeps the
    # resolution and relies on the dilated convolutions to grow the receptive field (the
    # reference's RefineNet design).
    if resample not in ("down", None):
        raise ValueError(f"Unknown resample {resample!r}; valid values: 'down', None.")
    h = act(norm(x))
    if resample == "down":
        h = ncsn_conv3x3(h, h.shape[-1], dilation=dilation)
        h = act(norm(h))
        if dilation > 1:
            h = ncsn_conv3x3(h, output_dim, dilation=dilation)
            shortcut = ncsn_conv3x3(x, output_dim, dilation=dilation)
        else:
            h = ConvMeanPool(output_dim)(h)
            shortcut = ConvMeanPool(output_dim, kernel_size=1)(x)
        return h + shortcut
    if output_dim == x.shape[-1]:
        shortcut = x
    elif dilation > 1:
        shortcut = ncsn_conv3x3(x, output_dim, dilation=dilation)
    else:
        shortcut = ncsn_conv1x1(x, output_dim)
    h = ncsn_conv3x3(h, output_dim, dilation=dilation)
    h = act(norm(h))
    h = ncsn_conv3x3(h, output_dim, dilation=dilation)
    return h + shortcut


class ResidualBlock(nn.Module):
    """Residual block of the NCSNv2 backbone: [B, H, W, C] -> [B, H', W', output_dim]
    (H' = H / 2 for resample='down' with dilation 1, else H)."""

    output_dim: int
    normalization: Any
    resample: str | None = None
    act: Any = nn.elu
    dilation: int = 1

    @nn.compact
    def __call__(self, x):
        norm = lambda h: self.normalization()(h)
        return _residual(x, self.output_dim, self.resample, self.act, self.dilation, norm)


class ConditionalResidualBlock(nn.Module):
    """Noise-conditional residual block of the NCSN v1 backbone: (x, y [B]) -> as
    ResidualBlock."""

    output_dim: int
    normalization: Any
    resample: str | None = None
    act: Any = nn.elu
    dilation: int = 1

    @nn.compact
    def __call__(self, x, y):
        norm = lambda h: self.normalization()(h, y)
        return _residual(x, self.output_dim, self.resample, self.act, self.dilation, norm)
