"""Noise-conditional Wide ResNet classifier for class-conditional sampling.

The classifier p_t(y | x(t)) of the paper's class-conditional CIFAR-10 experiment
(Song et al. 2021, App. I.4): a WRN-28-10 (Zagoruyko & Komodakis 2016) with GroupNorm in
place of BatchNorm, conditioned on the noise level through a Gaussian Fourier embedding of
log sigma that every residual block adds after its first convolution. With the default
sizes it has 38,913,242 parameters, 128 of which (the Fourier frequencies) are fixed.

Applied as `model.apply(variables, x [B, H, W, C], sigmas [B], train)` -> logits
[B, num_outputs]. The sum score(x, t) + grad_x log softmax(logits)[y] is the conditional
score (see controllable_generation).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import normalization
from models.registry import register_model

# He-normal initialization with fan_out, as in the WRN reference implementations.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _dense_out_init(key, shape, dtype=jnp.float32):
    """U[-1/sqrt(n_out), 1/sqrt(n_out)] for the logits layer (autoaugment's WRN)."""
    limit = 1.0 / np.sqrt(shape[1])
    return jax.random.uniform(key, shape, dtype, -limit, limit)


def _group_norm(x, name: str):
    # One group per 4 channels, at most 32 groups.
    return normalization.GroupNorm(num_groups=min(x.shape[-1] // 4, 32), epsilon=1e-5, name=name)(x)


def _output_add(block_x, orig_x):
    """block_x + orig_x, average-pooling and zero-padding orig_x's channels to match."""
    if block_x.shape[-1] != orig_x.shape[-1]:
        stride = orig_x.shape[2] // block_x.shape[2]
        orig_x = nn.avg_pool(orig_x, (stride, stride), (stride, stride))
        extra = block_x.shape[-1] - orig_x.shape[-1]
        orig_x = jnp.pad(orig_x, [(0, 0), (0, 0), (0, 0), (0, extra)])
    return block_x + orig_x


class GaussianFourierProjection(nn.Module):
    """[sin(2 pi W x), cos(2 pi W x)] with fixed W ~ N(0, scale^2): x [B] -> [B, 2 size]."""

    embedding_size: int = 128
    scale: float = 16.0

    @nn.compact
    def __call__(self, x):
        w = self.param("W", nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
        # The frequencies are a fixed random feature map, not trained.
        w = jax.lax.stop_gradient(w)
        proj = x[:, None] * w[None, :] * 2 * jnp.pi
        return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)


class WideResnetBlock(nn.Module):
    """Pre-activation WRN block; temb [B, D] is projected and added after the first conv."""

    channels: int
    strides: tuple[int, int] = (1, 1)
    activate_before_residual: bool = False

    @nn.compact
    def __call__(self, x, temb=None, train: bool = True):
        if self.activate_before_residual:
            # The first block of the network shares the activated input with the shortcut.
            x = nn.relu(_group_norm(x, "init_bn"))
            block_x = x
        else:
            block_x = nn.relu(_group_norm(x, "init_bn"))
        block_x = nn.Conv(self.channels, (3, 3), self.strides, padding="SAME", use_bias=False,
                          kernel_init=_conv_init, name="conv1")(block_x)
        if temb is not None:
            block_x = block_x + nn.Dense(self.channels)(nn.swish(temb))[:, None, None, :]
        block_x = nn.relu(_group_norm(block_x, "bn_2"))
        block_x = nn.Conv(self.channels, (3, 3), padding="SAME", use_bias=False,
                          kernel_init=_conv_init, name="conv2")(block_x)
        return _output_add(block_x, x)


class WideResnetGroup(nn.Module):
    """`blocks_per_group` WRN blocks; the first one applies `strides`."""

    blocks_per_group: int
    channels: int
    strides: tuple[int, int] = (1, 1)
    activate_before_residual: bool = False

    @nn.compact
    def __call__(self, x, temb=None, train: bool = True):
        for i in range(self.blocks_per_group):
            x = WideResnetBlock(self.channels, self.strides if i == 0 else (1, 1),
                                activate_before_residual=self.activate_before_residual and i == 0,
                                )(x, temb, train)
        return x


class WideResnet(nn.Module):
    """Noise-conditional WRN-(6 blocks_per_group + 4)-(channel_multiplier).

    __call__(x [B, H, W, C], sigmas [B] > 0, train) -> logits [B, num_outputs].
    """

    blocks_per_group: int = 4
    channel_multiplier: int = 10
    num_outputs: int = 10

    @nn.compact
    def __call__(self, x, sigmas, train: bool = True):
        # Per-image standardization; the std floor 1/sqrt(N) guards against constant images.
        n = np.prod(x.shape[1:])
        mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
        std = jnp.std(x, axis=(1, 2, 3), keepdims=True)
        x = (x - mean) / jnp.maximum(std, 1.0 / np.sqrt(n))

        temb = GaussianFourierProjection(embedding_size=128, scale=16.0)(jnp.log(sigmas))
        temb = nn.Dense(128 * 4)(temb)
        temb = nn.Dense(128 * 4)(nn.swish(temb))

        x = nn.Conv(16, (3, 3), padding="SAME", use_bias=False, kernel_init=_conv_init,
                    name="init_conv")(x)
        k = self.channel_multiplier
        x = WideResnetGroup(self.blocks_per_group, 16 * k, activate_before_residual=True)(
            x, temb, train)
        x = WideResnetGroup(self.blocks_per_group, 32 * k, (2, 2))(x, temb, train)
        x = WideResnetGroup(self.blocks_per_group, 64 * k, (2, 2))(x, temb, train)
        x = nn.relu(_group_norm(x, "pre-pool-bn"))
        x = jnp.mean(x, axis=(1, 2))  # global average pooling
        return nn.Dense(self.num_outputs, kernel_init=_dense_out_init)(x)


@register_model(name="wideresnet_noise_conditional")
class WideResnetNoiseConditional(nn.Module):
    """Registry entry: a WideResnet with the same fields, kept under the submodule name
    'WideResnet' (so parameters are named WideResnet/...).

    `create_model` reads config.model.blocks_per_group, channel_multiplier and num_outputs
    (or num_classes); the defaults give WRN-28-10 for CIFAR-10.
    __call__(x [B, H, W, C], sigmas [B] > 0, train) -> logits [B, num_outputs].
    """

    blocks_per_group: int = 4
    channel_multiplier: int = 10
    num_outputs: int = 10

    @nn.compact
    def __call__(self, x, t_or_sigma, train: bool = False):
        return WideResnet(blocks_per_group=self.blocks_per_group,
                          channel_multiplier=self.channel_multiplier,
                          num_outputs=self.num_outputs, name="WideResnet")(x, t_or_sigma, train)
