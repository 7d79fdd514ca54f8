"""NCSN++ and DDPM++ (Song et al. 2021, App. H): one U-Net with typed options.

DDPM++ is this network with resblock_type='biggan', fir=False, positional embeddings and no
progressive growing; NCSN++ adds FIR resampling, Fourier features of log sigma and a
residual input pyramid. `models.utils.create_model` fills the fields from a config's
`model` section (and `data.centered`, and the VE noise levels `sigmas`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from models import layers, layerspp
from models import precision as precision_lib
from models.registry import register_model

_CHOICES = {
    "resblock_type": ("ddpm", "biggan"),
    "progressive": ("none", "output_skip", "residual"),
    "progressive_input": ("none", "input_skip", "residual"),
    "progressive_combine": ("sum", "cat"),
    "embedding_type": ("fourier", "positional"),
}


@functools.cache
def _rematerialized(cls, static_argnums: tuple[int, ...]):
    """nn.remat(cls), built once per class."""
    return nn.remat(cls, static_argnums=static_argnums)


def _block_factory(remat: bool):
    """block(cls)(**fields) builds `cls` under flax's default names (cls_0, cls_1, ...),
    rematerialized in the backward pass when `remat`: the forward pass then keeps only each
    block's inputs (which the skip connections keep anyway) and recomputes the block's
    inside while differentiating it. The parameter tree is the same either way."""
    counters: dict[str, int] = {}

    def block(cls, static_argnums=()):
        # static_argnums count `self` as 0 (flax's convention).
        lifted = _rematerialized(cls, tuple(static_argnums)) if remat else cls

        def make(**fields):
            index = counters.get(cls.__name__, 0)
            counters[cls.__name__] = index + 1
            return lifted(name=f"{cls.__name__}_{index}", **fields)

        return make

    return block


@register_model(name="ncsnpp")
class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ score network; the defaults are the paper's CIFAR-10 NCSN++ (VE).

    __call__(x [B, H, W, C], time_cond [B], train) -> [B, H, W, C]. `time_cond` holds noise
    levels sigma for the Fourier embedding, timestep labels for the positional one (with
    scale_by_sigma, integer indices into `sigmas`).

    Fields:
      nf, ch_mult, num_res_blocks: base width, width multiplier per resolution, residual
        blocks per resolution.
      attn_resolutions: feature-map sizes (pixels) that get self-attention.
      dropout, resamp_with_conv, conditional (use the noise embedding), nonlinearity.
      fir, fir_kernel: FIR up/down-sampling and its 1D kernel.
      skip_rescale, init_scale: 1/sqrt(2) on residual sums; scale of the last convs' init.
      resblock_type: 'ddpm' | 'biggan'.
      progressive: 'none' | 'output_skip' | 'residual' (output pyramid).
      progressive_input: 'none' | 'input_skip' | 'residual' (input pyramid).
      progressive_combine: 'sum' | 'cat' (how input_skip merges).
      embedding_type: 'fourier' (labels are sigmas; embeds log sigma) | 'positional'.
      fourier_scale: std of the random Fourier frequencies.
      scale_by_sigma: divide the output by sigma (the label itself for 'fourier', sigmas[label]
        for 'positional').
      centered: inputs already in [-1, 1]; otherwise [0, 1] inputs are mapped to [-1, 1].
      sigmas: the VE noise levels from sigma_max down [num_scales]; needed only for
        scale_by_sigma with positional embeddings.
      precision: 'float32' | 'bfloat16', the operands of convolutions and matrix products
        (models.precision; config.training.precision).
      remat: rematerialize every residual and attention block in the backward pass: less
        activation memory for about one more forward pass of compute
        (config.training.remat).
    """

    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.1
    resamp_with_conv: bool = True
    conditional: bool = True
    fir: bool = True
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    init_scale: float = 0.0
    nonlinearity: str = "swish"
    resblock_type: str = "biggan"
    progressive: str = "none"
    progressive_input: str = "residual"
    progressive_combine: str = "sum"
    embedding_type: str = "fourier"
    fourier_scale: float = 16.0
    scale_by_sigma: bool = True
    centered: bool = False
    sigmas: tuple[float, ...] | None = None
    precision: str = "float32"
    remat: bool = False

    def _check_options(self, x):
        for key, valid in _CHOICES.items():
            value = str(getattr(self, key)).lower()
            if value not in valid:
                raise ValueError(f"NCSNpp {key}={value!r} is not valid; choose from "
                                 f"{list(valid)}.")
        size, levels = x.shape[1], len(self.ch_mult)
        if size % (2 ** (levels - 1)) != 0:
            raise ValueError(f"image_size {size} is not divisible by 2^(len(ch_mult) - 1) = "
                             f"{2 ** (levels - 1)}.")

    @nn.compact
    def __call__(self, x, time_cond, train: bool = True):
        self._check_options(x)
        block = _block_factory(self.remat)
        precision_lib.check_precision(self.precision)
        p = self.precision
        act = layers.get_act(self.nonlinearity)
        nf = self.nf
        ch_mult = tuple(self.ch_mult)
        num_res_blocks = self.num_res_blocks
        attn_resolutions = tuple(self.attn_resolutions)
        num_resolutions = len(ch_mult)
        fir, fir_kernel = self.fir, tuple(self.fir_kernel)
        skip_rescale = self.skip_rescale
        init_scale = self.init_scale
        resblock_type = self.resblock_type.lower()
        progressive = self.progressive.lower()
        progressive_input = self.progressive_input.lower()
        embedding_type = self.embedding_type.lower()
        combine_method = self.progressive_combine.lower()
        channels = x.shape[-1]

        # Noise-level embedding.
        if embedding_type == "fourier":
            used_sigmas = time_cond
            temb = layerspp.GaussianFourierProjection(
                embedding_size=nf, scale=self.fourier_scale)(jnp.log(used_sigmas))
        else:
            temb = layers.get_timestep_embedding(time_cond, nf)
            used_sigmas = None
            if self.scale_by_sigma:
                if self.sigmas is None:
                    raise ValueError("NCSNpp with scale_by_sigma and positional embeddings "
                                     "needs the VE noise levels `sigmas`; got None.")
                # Positional labels are indices into the discrete VE noise levels.
                sigmas = jnp.asarray(self.sigmas, jnp.float32)
                used_sigmas = sigmas[time_cond.astype(jnp.int32)]

        if self.conditional:
            temb = layerspp._dense(nf * 4, p)(temb)
            temb = layerspp._dense(nf * 4, p)(act(temb))
        else:
            temb = None

        AttnBlock = functools.partial(block(layerspp.AttnBlockpp), init_scale=init_scale,
                                      skip_rescale=skip_rescale, precision=p)
        Upsample = functools.partial(layerspp.Upsample, with_conv=self.resamp_with_conv, fir=fir,
                                     fir_kernel=fir_kernel, precision=p)
        Downsample = functools.partial(layerspp.Downsample, with_conv=self.resamp_with_conv,
                                       fir=fir, fir_kernel=fir_kernel, precision=p)
        # output_skip pyramids resample images (no conv); residual pyramids resample features.
        pyramid_upsample = functools.partial(layerspp.Upsample, fir=fir, fir_kernel=fir_kernel,
                                             with_conv=progressive == "residual", precision=p)
        pyramid_downsample = functools.partial(layerspp.Downsample, fir=fir,
                                               fir_kernel=fir_kernel,
                                               with_conv=progressive_input == "residual",
                                               precision=p)
        if resblock_type == "ddpm":
            ResnetBlock = functools.partial(block(layerspp.ResnetBlockDDPMpp, (3,)), act=act,
                                            dropout=self.dropout, init_scale=init_scale,
                                            skip_rescale=skip_rescale, precision=p)
        else:
            ResnetBlock = functools.partial(block(layerspp.ResnetBlockBigGANpp, (3,)), act=act,
                                            dropout=self.dropout, fir=fir, fir_kernel=fir_kernel,
                                            init_scale=init_scale, skip_rescale=skip_rescale,
                                            precision=p)

        if not self.centered:
            # Data in [0, 1]: the network works on [-1, 1].
            x = 2 * x - 1.0

        # Downsampling path.
        input_pyramid = x if progressive_input != "none" else None
        hs = [layers.ddpm_conv3x3(x, nf, precision=p)]
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
                    h = layerspp.Combine(method=combine_method, precision=p)(input_pyramid,
                                                                             h)
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
                                                      init_scale=init_scale, precision=p)
                    else:
                        pyramid = layers.ddpm_conv3x3(act(layerspp._group_norm(h)),
                                                      h.shape[-1], precision=p)
                elif progressive == "output_skip":
                    pyramid = pyramid_upsample()(pyramid)
                    pyramid = pyramid + layers.ddpm_conv3x3(
                        act(layerspp._group_norm(h)), channels, init_scale=init_scale,
                        precision=p)
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
            h = layers.ddpm_conv3x3(h, channels, init_scale=init_scale, precision=p)

        if self.scale_by_sigma:
            if used_sigmas is None:
                raise ValueError("scale_by_sigma needs noise levels (Fourier embedding) or VE "
                                 "indices (positional embedding).")
            h = h / used_sigmas.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
        return h

