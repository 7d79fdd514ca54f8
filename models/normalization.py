"""Normalization layers of the NCSN (v1) and NCSNv2 RefineNets.

All layers act on NHWC images x [B, H, W, C] and normalize over the spatial axes of each
example and channel (instance statistics), as in Song & Ermon (2019, 2020). The
"++" variants add back a learned multiple of the standardized per-channel means, so that
instance normalization does not erase the relative colour of the channels.

Conditional layers take integer class / noise-level indices y [B] and look up their affine
parameters in an embedding table with one row per index.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_EPS = 1e-5


class GroupNorm(nn.Module):
    """Group normalization (Wu & He 2018) over all axes but the batch and the channels.

    The parameters (`scale` [C] at one, `bias` [C] at zero), defaults and results of
    `flax.linen.GroupNorm` (statistics in float32), computed in a form XLA:CPU runs several
    times faster: per-channel sums over the positions first (a reduction over the rows of a
    [B, positions, C] matrix), then over the channels of each group. The variance is the mean
    of (x - mean)^2, not E[x^2] - E[x]^2, which loses most of its digits in float32 when the
    mean is large against the spread.
    """

    num_groups: int = 32
    epsilon: float = 1e-6

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels do not split into num_groups="
                             f"{self.num_groups} groups.")
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        dtype = jnp.promote_types(x.dtype, jnp.float32)
        rows = x.astype(dtype).reshape(x.shape[0], -1, c)
        per_group = c // self.num_groups
        count = rows.shape[1] * per_group

        def group_mean(s):
            # [B, C] channel sums -> [B, C] means of each channel's group.
            m = s.reshape(-1, self.num_groups, per_group).sum(-1) / count
            return jnp.repeat(m, per_group, axis=1)

        mean = group_mean(rows.sum(1))
        centered = rows - mean[:, None, :]
        var = group_mean((centered * centered).sum(1))
        shape = (x.shape[0],) + (1,) * (x.ndim - 2) + (c,)
        mul = (lax.rsqrt(var + self.epsilon) * scale).reshape(shape)
        # (x - mean) * mul + bias rather than x * mul + (bias - mean * mul): the same cost
        # forward, but the gradient of the folded form kept a further activation-sized
        # buffer alive in the CIFAR-10 NCSN++ train step (XLA temporaries 1025 vs 910 MiB).
        return (x.astype(dtype) - mean.reshape(shape)) * mul + bias


def _near_one(key, shape, dtype=jnp.float32):
    """N(1, 0.02^2): the reference's initializer for scales (keeps layers near identity)."""
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


def _instance_stats(x):
    """Per-example, per-channel spatial mean and variance: each [B, 1, 1, C]."""
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.var(x, axis=(1, 2), keepdims=True)
    return mean, var


def _standardized_means(mean):
    """Channel means [B, 1, 1, C] standardized across channels of each example."""
    m = jnp.mean(mean, axis=-1, keepdims=True)
    v = jnp.var(mean, axis=-1, keepdims=True)
    return (mean - m) / jnp.sqrt(v + _EPS)


def _as_index(y):
    """Class / noise-level labels as int32 indices (float labels are rounded)."""
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.integer):
        y = jnp.round(y)
    return y.astype(jnp.int32)


class VarianceNorm2d(nn.Module):
    """x / sqrt(Var_HW[x] + eps) * gamma (+ beta): divides by the spatial std, keeps the mean."""

    bias: bool = False

    @nn.compact
    def __call__(self, x):
        _, var = _instance_stats(x)
        h = x / jnp.sqrt(var + _EPS)
        h = h * self.param("scale", _near_one, (x.shape[-1],))
        if self.bias:
            h = h + self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return h


class InstanceNorm2d(nn.Module):
    """Plain instance normalization: (x - mean_HW) / sqrt(Var_HW + eps) * gamma + beta."""

    bias: bool = True

    @nn.compact
    def __call__(self, x):
        mean, var = _instance_stats(x)
        h = (x - mean) / jnp.sqrt(var + _EPS)
        h = h * self.param("scale", nn.initializers.ones, (x.shape[-1],))
        if self.bias:
            h = h + self.param("bias", nn.initializers.zeros, (x.shape[-1],))
        return h


class InstanceNorm2dPlus(nn.Module):
    """InstanceNorm++ (NCSN, Song & Ermon 2019, Eq. 6).

    With mu_c, s_c^2 the spatial mean and variance of channel c, and m, v the mean and
    variance of (mu_c) over channels:
        out = gamma_c ((x - mu_c) / sqrt(s_c^2 + eps) + alpha_c (mu_c - m) / sqrt(v + eps))
              + beta_c.
    """

    bias: bool = True

    @nn.compact
    def __call__(self, x):
        mean, var = _instance_stats(x)
        h = (x - mean) / jnp.sqrt(var + _EPS)
        h = h + _standardized_means(mean) * self.param("alpha", _near_one, (x.shape[-1],))
        h = h * self.param("gamma", _near_one, (x.shape[-1],))
        if self.bias:
            h = h + self.param("beta", nn.initializers.zeros, (x.shape[-1],))
        return h


class ConditionalInstanceNorm2dPlus(nn.Module):
    """Conditional InstanceNorm++: InstanceNorm++ whose gamma, alpha, beta depend on y.

    __call__(x [B, H, W, C], y [B] int) -> [B, H, W, C]. The table has `num_classes` rows of
    [gamma | alpha | beta] (3C values; 2C without bias), gamma and alpha initialized near 1,
    beta at 0.
    """

    num_classes: int = 10
    bias: bool = True

    @nn.compact
    def __call__(self, x, y):
        c = x.shape[-1]
        n_affine = 3 if self.bias else 2

        def embedding_init(key, shape, dtype=jnp.float32):
            scales = _near_one(key, (shape[0], 2 * c), dtype)
            return jnp.concatenate([scales, jnp.zeros((shape[0], shape[1] - 2 * c), dtype)],
                                   axis=-1)

        embed = nn.Embed(num_embeddings=self.num_classes, features=n_affine * c,
                         embedding_init=embedding_init)
        params = embed(_as_index(y))[:, None, None, :]
        gamma, alpha = params[..., :c], params[..., c:2 * c]

        mean, var = _instance_stats(x)
        h = (x - mean) / jnp.sqrt(var + _EPS)
        h = gamma * (h + _standardized_means(mean) * alpha)
        if self.bias:
            h = h + params[..., 2 * c:]
        return h


_UNCONDITIONAL = {
    "InstanceNorm": InstanceNorm2d,
    "InstanceNorm++": InstanceNorm2dPlus,
    "VarianceNorm": VarianceNorm2d,
    "GroupNorm": GroupNorm,
}
_CONDITIONAL = ("InstanceNorm++",)


def get_normalization(name: str, conditional: bool = False, num_classes: int | None = None):
    """The normalization factory named `name` (e.g. 'InstanceNorm++', 'GroupNorm').

    Returns a zero-argument module factory: `norm()(x)` for unconditional layers and
    `norm()(x, y)` for conditional ones, which need `num_classes`, the number of embedding
    rows (one per noise level).
    """
    if conditional:
        if name not in _CONDITIONAL:
            raise ValueError(f"Unknown conditional normalization {name!r}; valid names: "
                             f"{list(_CONDITIONAL)}.")
        if num_classes is None or int(num_classes) < 1:
            raise ValueError(f"Conditional normalization {name!r} needs num_classes >= 1 (one "
                             f"embedding row per noise level), got {num_classes!r}.")
        return functools.partial(ConditionalInstanceNorm2dPlus, num_classes=int(num_classes))
    if name not in _UNCONDITIONAL:
        raise ValueError(f"Unknown normalization {name!r}; valid names: {sorted(_UNCONDITIONAL)}.")
    return _UNCONDITIONAL[name]
