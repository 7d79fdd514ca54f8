"""DDPM's U-Net (Ho et al. 2020), the model behind the paper's vp/ddpm and ve/cifar10_ddpm configs.

Timestep labels get a sinusoidal embedding and a two-layer MLP; every residual block adds
the embedding as a per-channel bias. `models.utils.create_model` fills the fields from a
config's `model` section (and `data.centered`, and the VE noise levels `sigmas`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from models import layers, normalization
from models.registry import register_model


@register_model(name="ddpm")
class DDPM(nn.Module):
    """DDPM score / noise-prediction network; the defaults are DDPM's CIFAR-10 network.

    __call__(x [B, H, W, C], labels [B], train) -> [B, H, W, C]. `labels` are timestep
    indices (floats allowed, e.g. 999 t); with scale_by_sigma they index `sigmas`.

    Fields: nf (base width), ch_mult (width multiplier per resolution), num_res_blocks (per
    resolution), attn_resolutions (feature-map sizes with self-attention), dropout,
    resamp_with_conv, conditional (use the timestep embedding), nonlinearity, scale_by_sigma
    (divide the output by sigmas[label], NCSN-style VE training), centered (inputs already in
    [-1, 1]), sigmas (the VE noise levels from sigma_max down [num_scales]; needed only for
    scale_by_sigma).
    """

    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    conditional: bool = True
    nonlinearity: str = "swish"
    scale_by_sigma: bool = False
    centered: bool = True
    sigmas: tuple[float, ...] | None = None

    @nn.compact
    def __call__(self, x, labels, train: bool = True):
        act = layers.get_act(self.nonlinearity)
        nf = self.nf
        ch_mult = tuple(self.ch_mult)
        num_res_blocks = self.num_res_blocks
        attn_resolutions = tuple(self.attn_resolutions)
        num_resolutions = len(ch_mult)
        size = x.shape[1]
        if size % (2 ** (num_resolutions - 1)) != 0:
            raise ValueError(f"image_size {size} is not divisible by 2^(len(ch_mult) - 1) = "
                             f"{2 ** (num_resolutions - 1)}.")
        if self.scale_by_sigma and self.sigmas is None:
            raise ValueError("DDPM with scale_by_sigma needs the VE noise levels `sigmas`; "
                             "got None.")

        if self.conditional:
            temb = layers.get_timestep_embedding(labels, nf)
            temb = nn.Dense(nf * 4, kernel_init=layers.default_init())(temb)
            temb = nn.Dense(nf * 4, kernel_init=layers.default_init())(act(temb))
        else:
            temb = None

        ResnetBlock = functools.partial(layers.ResnetBlockDDPM, act=act, dropout=self.dropout)

        # Data in [0, 1] is mapped to [-1, 1]; centered data already is.
        h = x if self.centered else 2 * x - 1.0

        # Downsampling path.
        hs = [layers.ddpm_conv3x3(h, nf)]
        for i_level in range(num_resolutions):
            for _ in range(num_res_blocks):
                h = ResnetBlock(out_ch=nf * ch_mult[i_level])(hs[-1], temb, train)
                if h.shape[1] in attn_resolutions:
                    h = layers.AttnBlock()(h)
                hs.append(h)
            if i_level != num_resolutions - 1:
                hs.append(layers.Downsample(with_conv=self.resamp_with_conv)(hs[-1]))

        # Bottleneck.
        h = hs[-1]
        h = ResnetBlock()(h, temb, train)
        h = layers.AttnBlock()(h)
        h = ResnetBlock()(h, temb, train)

        # Upsampling path.
        for i_level in reversed(range(num_resolutions)):
            for _ in range(num_res_blocks + 1):
                h = ResnetBlock(out_ch=nf * ch_mult[i_level])(
                    jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
            if h.shape[1] in attn_resolutions:
                h = layers.AttnBlock()(h)
            if i_level != 0:
                h = layers.Upsample(with_conv=self.resamp_with_conv)(h)
        assert not hs, "every skip connection must be consumed"

        h = act(normalization.GroupNorm(num_groups=32, epsilon=1e-6)(h))
        h = layers.ddpm_conv3x3(h, x.shape[-1], init_scale=0.0)

        if self.scale_by_sigma:
            # NCSN-style training divides the output by sigma; labels index the noise levels.
            sigmas = jnp.asarray(self.sigmas, jnp.float32)
            h = h / sigmas[labels.astype(jnp.int32)][:, None, None, None]
        return h
