"""Layers of NCSN++ / DDPM++ (Song et al. 2021, App. H), NHWC.

Differences from the DDPM blocks in `layers`: GroupNorm uses min(C // 4, 32) groups, residual
sums can be rescaled by 1/sqrt(2) (`skip_rescale`), the zero-initialized output convs take
`init_scale`, and resampling can use FIR filters (`up_or_down_sampling`).

Fixed Fourier features: `GaussianFourierProjection.W` lives in the 'params' collection (the
reference counts it among the parameters and stores it in checkpoints) but is wrapped in
`stop_gradient`, so its gradient is exactly zero. Adam without weight decay then moves it by
exactly 0 (m = v = 0 gives a zero update). For optimizers that would move a parameter with a
zero gradient (weight decay, for example), `trainable_mask(params)` marks it False; wrap the
optimizer as `optax.multi_transform({True: opt, False: optax.set_to_zero()},
trainable_mask(params))` to freeze it provably.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from models import layers, normalization, up_or_down_sampling
from models import precision as precision_lib

conv1x1 = layers.ddpm_conv1x1
conv3x3 = layers.ddpm_conv3x3
NIN = layers.NIN
default_init = layers.default_init


def _dense(features, precision):
    """The time-embedding projection: Dense with default_init and products in `precision`."""
    return nn.Dense(features, kernel_init=default_init(),
                    dot_general=precision_lib.dot_fn(precision))


def _group_norm(x):
    """GroupNorm with min(C // 4, 32) groups and eps 1e-6, as in NCSN++."""
    return normalization.GroupNorm(num_groups=min(x.shape[-1] // 4, 32), epsilon=1e-6)(x)


def _residual_sum(x, h, skip_rescale: bool):
    """x + h (divided by sqrt(2) when `skip_rescale`) as a `layers.ResidualSum`; called from
    within a compact method."""
    return layers.ResidualSum(skip_rescale)(x, h)


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of a scalar (log noise level); the frequencies are FIXED.

    x [B] -> [B, 2 * embedding_size] = [sin(2 pi x W), cos(2 pi x W)], W ~ N(0, scale^2).
    """

    embedding_size: int = 256
    scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        w = self.param("W", nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
        # Fixed random features, not learned: no gradient ever reaches W.
        w = jax.lax.stop_gradient(w)
        x_proj = x[:, None] * w[None, :] * 2 * jnp.pi
        return jnp.concatenate([jnp.sin(x_proj), jnp.cos(x_proj)], axis=-1)


def trainable_mask(params) -> Any:
    """Pytree of bools shaped like `params`: False for fixed parameters (Fourier features W)."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    mask = {path: not (path[-1] == "W" and len(path) > 1
                       and path[-2].startswith("GaussianFourierProjection"))
            for path in flat}
    return flax.traverse_util.unflatten_dict(mask)


class Combine(nn.Module):
    """Merges an input-pyramid image x into features y: conv1x1(x) then concat or sum.

    x [B, H, W, Cx], y [B, H, W, Cy] -> [B, H, W, 2 Cy] ('cat') or [B, H, W, Cy] ('sum').
    """

    method: str = "cat"
    precision: str = "float32"

    @nn.compact
    def __call__(self, x, y):
        h = conv1x1(x, y.shape[-1], precision=self.precision)
        if self.method == "cat":
            return jnp.concatenate([h, y], axis=-1)
        if self.method == "sum":
            return h + y
        raise ValueError(f"Unknown combine method {self.method!r}; valid names: ['cat', 'sum'].")


class AttnBlockpp(nn.Module):
    """Self-attention block of NCSN++ (DDPM's with min(C//4, 32) groups and skip_rescale)."""

    skip_rescale: bool = False
    init_scale: float = 0.0
    precision: str = "float32"

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        p = self.precision
        h = _group_norm(x)
        q = NIN(c, precision=p)(h)
        k = NIN(c, precision=p)(h)
        v = NIN(c, precision=p)(h)
        h = layers.spatial_self_attention(q, k, v, p)
        h = NIN(c, init_scale=self.init_scale, precision=p)(h)
        return _residual_sum(x, h, self.skip_rescale)


class _Resample(nn.Module):
    """The fields of Upsample and Downsample: out_ch (None: the input's channels), a 3x3
    convolution or not, FIR resampling or not, its kernel, and the products' precision."""

    out_ch: int | None = None
    with_conv: bool = False
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    precision: str = "float32"

    def fir_conv(self, x, **up_or_down):
        """The fused FIR resampling 3x3 convolution (StyleGAN2's), called from __call__."""
        return up_or_down_sampling.Conv2d(self.out_ch or x.shape[-1], kernel=3,
                                          resample_kernel=tuple(self.fir_kernel), use_bias=True,
                                          kernel_init=default_init(), precision=self.precision,
                                          **up_or_down)(x)


class Upsample(_Resample):
    """2x upsampling: nearest (+ 3x3 conv) or FIR (+ fused FIR up-conv). [B,H,W,C]->2H,2W,out."""

    @nn.compact
    def __call__(self, x):
        if not self.fir:
            h = up_or_down_sampling.naive_upsample_2d(x, factor=2)
            if self.with_conv:
                h = conv3x3(h, self.out_ch or x.shape[-1], precision=self.precision)
        elif not self.with_conv:
            h = up_or_down_sampling.upsample_2d(x, self.fir_kernel, factor=2)
        else:
            h = self.fir_conv(x, up=True)
        return h


class Downsample(_Resample):
    """2x downsampling: avg-pool / stride-2 conv, or FIR (+ fused conv-down)."""

    @nn.compact
    def __call__(self, x):
        if not self.fir:
            if self.with_conv:
                x = conv3x3(x, self.out_ch or x.shape[-1], stride=2, precision=self.precision)
            else:
                x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding="SAME")
        elif not self.with_conv:
            x = up_or_down_sampling.downsample_2d(x, self.fir_kernel, factor=2)
        else:
            x = self.fir_conv(x, down=True)
        return x


def _conditioned_convs(block, h, temb, out_ch: int, train: bool):
    """conv3x3 -> + Dense(act(temb)) -> act(GroupNorm) -> Dropout -> conv3x3 (init_scale): the
    residual path shared by the NCSN++ residual blocks (`block` gives act, dropout, init_scale
    and precision); called from within the block's compact method."""
    p = block.precision
    h = conv3x3(h, out_ch, precision=p)
    if temb is not None:
        h = h + _dense(out_ch, p)(block.act(temb))[:, None, None, :]
    h = block.act(_group_norm(h))
    h = layers.Dropout(block.dropout)(h, deterministic=not train)
    return conv3x3(h, out_ch, init_scale=block.init_scale, precision=p)


class ResnetBlockDDPMpp(nn.Module):
    """DDPM residual block with NCSN++ group counts, init_scale and skip_rescale.

    x [B, H, W, C], temb [B, D] or None -> [B, H, W, out_ch].
    """

    act: Any
    out_ch: int | None = None
    conv_shortcut: bool = False
    dropout: float = 0.1
    skip_rescale: bool = False
    init_scale: float = 0.0
    precision: str = "float32"

    @nn.compact
    def __call__(self, x, temb=None, train: bool = True):
        out_ch = self.out_ch or x.shape[-1]
        h = _conditioned_convs(self, self.act(_group_norm(x)), temb, out_ch, train)
        if x.shape[-1] != out_ch:  # the skip connection changes the channel count
            x = conv3x3(x, out_ch, precision=self.precision) if self.conv_shortcut else \
                NIN(out_ch, precision=self.precision)(x)
        return _residual_sum(x, h, self.skip_rescale)


class ResnetBlockBigGANpp(nn.Module):
    """BigGAN-style residual block that can resample (FIR or naive) inside the block.

    x [B, H, W, C], temb [B, D] or None -> [B, H', W', out_ch], H' = 2H (up), H/2 (down), H.
    """

    act: Any
    up: bool = False
    down: bool = False
    out_ch: int | None = None
    dropout: float = 0.1
    fir: bool = False
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    precision: str = "float32"

    @nn.compact
    def __call__(self, x, temb=None, train: bool = True):
        out_ch = self.out_ch or x.shape[-1]
        h = self.act(_group_norm(x))
        if self.up or self.down:  # the same 2x resampling of both paths
            if self.fir:
                resample = functools.partial(
                    up_or_down_sampling.upsample_2d if self.up else
                    up_or_down_sampling.downsample_2d, k=self.fir_kernel, factor=2)
            else:
                resample = functools.partial(
                    up_or_down_sampling.naive_upsample_2d if self.up else
                    up_or_down_sampling.naive_downsample_2d, factor=2)
            h, x = resample(h), resample(x)
        h = _conditioned_convs(self, h, temb, out_ch, train)
        if x.shape[-1] != out_ch or self.up or self.down:
            x = conv1x1(x, out_ch, precision=self.precision)
        return _residual_sum(x, h, self.skip_rescale)
