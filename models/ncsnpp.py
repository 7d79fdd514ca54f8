"""NCSN++ and DDPM++ (Song et al. 2021, App. H): one U-Net, configured by `config.model`.

DDPM++ is this network with resblock_type='biggan', fir=False, positional embeddings and no
progressive growing; NCSN++ adds FIR resampling, Fourier features of log sigma and a
residual input pyramid. Options (all in `config.model`):

  nf, ch_mult, num_res_blocks, attn_resolutions, dropout, resamp_with_conv, conditional,
  fir, fir_kernel, skip_rescale, init_scale, nonlinearity,
  resblock_type: 'ddpm' | 'biggan'
  progressive: 'none' | 'output_skip' | 'residual'        (output pyramid)
  progressive_input: 'none' | 'input_skip' | 'residual'   (input pyramid)
  progressive_combine: 'sum' | 'cat'                      (how input_skip merges)
  embedding_type: 'fourier' (labels are sigmas, embeds log sigma) | 'positional'
  fourier_scale, scale_by_sigma (divide the output by sigma; needs sigma labels or indices)
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from models import layers, layerspp
from models.utils import get_sigmas, register_model

_CHOICES = {
    "resblock_type": ("ddpm", "biggan"),
    "progressive": ("none", "output_skip", "residual"),
    "progressive_input": ("none", "input_skip", "residual"),
    "progressive_combine": ("sum", "cat"),
    "embedding_type": ("fourier", "positional"),
}


def _check_options(config):
    for key, valid in _CHOICES.items():
        value = str(config.model[key]).lower()
        if value not in valid:
            raise ValueError(f"config.model.{key}={value!r} is not valid; choose from "
                             f"{list(valid)}.")
    size, levels = config.data.image_size, len(config.model.ch_mult)
    if size % (2 ** (levels - 1)) != 0:
        raise ValueError(f"image_size {size} is not divisible by 2^(len(ch_mult) - 1) = "
                         f"{2 ** (levels - 1)}.")


@register_model(name="ncsnpp")
class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ score network.

    __call__(x [B, H, W, C], time_cond [B], train) -> [B, H, W, C]. `time_cond` holds noise
    levels sigma for the Fourier embedding, timestep labels for the positional one.
    """

    config: object

    @nn.compact
    def __call__(self, x, time_cond, train: bool = True):
        config = self.config
        _check_options(config)
        m = config.model
        act = layers.get_act(config)
        nf = m.nf
        ch_mult = tuple(m.ch_mult)
        num_res_blocks = m.num_res_blocks
        attn_resolutions = tuple(m.attn_resolutions)
        num_resolutions = len(ch_mult)
        fir, fir_kernel = m.fir, tuple(m.fir_kernel)
        skip_rescale = m.skip_rescale
        init_scale = m.init_scale
        resblock_type = m.resblock_type.lower()
        progressive = m.progressive.lower()
        progressive_input = m.progressive_input.lower()
        embedding_type = m.embedding_type.lower()
        combine_method = m.progressive_combine.lower()
        channels = x.shape[-1]

        # Noise-level embedding.
        if embedding_type == "fourier":
            if "training" in config and not config.training.get("continuous", True):
                raise ValueError("Fourier embeddings take noise levels sigma as labels; they "
                                 "are only used with continuous training "
                                 "(config.training.continuous=True).")
            used_sigmas = time_cond
            temb = layerspp.GaussianFourierProjection(
                embedding_size=nf, scale=m.fourier_scale)(jnp.log(used_sigmas))
        else:
            temb = layers.get_timestep_embedding(time_cond, nf)
            used_sigmas = None
            if m.scale_by_sigma:
                # Positional labels are indices into the discrete VE noise levels.
                sigmas = jnp.asarray(get_sigmas(config), jnp.float32)
                used_sigmas = sigmas[time_cond.astype(jnp.int32)]

        if m.conditional:
            temb = nn.Dense(nf * 4, kernel_init=layers.default_init())(temb)
            temb = nn.Dense(nf * 4, kernel_init=layers.default_init())(act(temb))
        else:
            temb = None

        AttnBlock = functools.partial(layerspp.AttnBlockpp, init_scale=init_scale,
                                      skip_rescale=skip_rescale)
        Upsample = functools.partial(layerspp.Upsample, with_conv=m.resamp_with_conv, fir=fir,
                                     fir_kernel=fir_kernel)
        Downsample = functools.partial(layerspp.Downsample, with_conv=m.resamp_with_conv,
                                       fir=fir, fir_kernel=fir_kernel)
        # output_skip pyramids resample images (no conv); residual pyramids resample features.
        pyramid_upsample = functools.partial(layerspp.Upsample, fir=fir, fir_kernel=fir_kernel,
                                             with_conv=progressive == "residual")
        pyramid_downsample = functools.partial(layerspp.Downsample, fir=fir,
                                               fir_kernel=fir_kernel,
                                               with_conv=progressive_input == "residual")
        if resblock_type == "ddpm":
            ResnetBlock = functools.partial(layerspp.ResnetBlockDDPMpp, act=act,
                                            dropout=m.dropout, init_scale=init_scale,
                                            skip_rescale=skip_rescale)
        else:
            ResnetBlock = functools.partial(layerspp.ResnetBlockBigGANpp, act=act,
                                            dropout=m.dropout, fir=fir, fir_kernel=fir_kernel,
                                            init_scale=init_scale, skip_rescale=skip_rescale)

        if not config.data.centered:
            # Data in [0, 1]: the network works on [-1, 1].
            x = 2 * x - 1.0

        # Downsampling path.
        input_pyramid = x if progressive_input != "none" else None
        hs = [layers.ddpm_conv3x3(x, nf)]
        for i_level in range(num_resolutions):
            for _ in range(num_res_blocks):
                h = ResnetBlock(out_ch=nf * ch_mult[i_level])(hs[-1], temb, train)
                if h.shape[1] in attn_resolutions:
                    h = AttnBlock()(h)
                hs.append(h)

            if i_level != num_resolutions - 1:
                if resblock_type == "ddpm":
                    h = Downsample()(hs[-1])
                else:
                    h = ResnetBlock(down=True)(hs[-1], temb, train)

                if progressive_input == "input_skip":
                    input_pyramid = pyramid_downsample()(input_pyramid)
                    h = layerspp.Combine(method=combine_method)(input_pyramid, h)
                elif progressive_input == "residual":
                    input_pyramid = pyramid_downsample(out_ch=h.shape[-1])(input_pyramid)
                    input_pyramid = layerspp._residual_sum(input_pyramid, h, skip_rescale)
                    h = input_pyramid
                hs.append(h)

        # Bottleneck.
        h = hs[-1]
        h = ResnetBlock()(h, temb, train)
        h = AttnBlock()(h)
        h = ResnetBlock()(h, temb, train)

        # Upsampling path.
        pyramid = None
        for i_level in reversed(range(num_resolutions)):
            for _ in range(num_res_blocks + 1):
                h = ResnetBlock(out_ch=nf * ch_mult[i_level])(
                    jnp.concatenate([h, hs.pop()], axis=-1), temb, train)

            if h.shape[1] in attn_resolutions:
                h = AttnBlock()(h)

            if progressive != "none":
                if i_level == num_resolutions - 1:
                    if progressive == "output_skip":
                        pyramid = layers.ddpm_conv3x3(act(layerspp._group_norm(h)), channels,
                                                      init_scale=init_scale)
                    else:
                        pyramid = layers.ddpm_conv3x3(act(layerspp._group_norm(h)),
                                                      h.shape[-1])
                elif progressive == "output_skip":
                    pyramid = pyramid_upsample()(pyramid)
                    pyramid = pyramid + layers.ddpm_conv3x3(
                        act(layerspp._group_norm(h)), channels, init_scale=init_scale)
                else:
                    pyramid = pyramid_upsample(out_ch=h.shape[-1])(pyramid)
                    pyramid = layerspp._residual_sum(pyramid, h, skip_rescale)
                    h = pyramid

            if i_level != 0:
                if resblock_type == "ddpm":
                    h = Upsample()(h)
                else:
                    h = ResnetBlock(up=True)(h, temb, train)

        assert not hs, "every skip connection must be consumed"

        if progressive == "output_skip":
            h = pyramid
        else:
            h = act(layerspp._group_norm(h))
            h = layers.ddpm_conv3x3(h, channels, init_scale=init_scale)

        if m.scale_by_sigma:
            if used_sigmas is None:
                raise ValueError("scale_by_sigma needs noise levels (Fourier embedding) or VE "
                                 "indices (positional embedding).")
            h = h / used_sigmas.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
        return h

