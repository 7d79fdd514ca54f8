"""NCSN (v1) and NCSNv2 score networks: RefineNets on a dilated ResNet backbone.

NCSN (Song & Ermon 2019) is noise-conditional: every normalization is a conditional
InstanceNorm++ indexed by the noise level. NCSNv2 (Song & Ermon 2020) is unconditional and
instead divides its output by the noise level sigma of each example (`scale_by_sigma`),
using the geometric sigmas of `get_sigmas`.

Both are applied as `model.apply(variables, x [B, H, W, C], labels [B], train)` and return
[B, H, W, C]. `labels` are integer noise-level indices into the VE noise levels listed from
sigma_max down (`models.utils.get_sigmas`): the discrete VE convention of the paper. Float
labels are rounded.

Data in [0, 1] (centered=False) are mapped to [-1, 1] first, as in the reference.
`models.utils.create_model` fills the fields from a config's `model` section (and
`data.centered`, and the noise levels `sigmas`).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from models.layers import (
    ConditionalResidualBlock,
    CondRefineBlock,
    RefineBlock,
    ResidualBlock,
    get_act,
    ncsn_conv3x3,
)
from models.normalization import get_normalization
from models.registry import register_model


def _label_index(labels):
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        labels = jnp.round(labels)
    return labels.astype(jnp.int32)


# Backbone stages as (channel multiplier, dilation). Stage 0 keeps the resolution; every later
# stage opens with a resample='down' block, which halves the resolution only when its
# dilation is 1. `refine` lists the RefineBlock widths from the deepest stage to the first.
_ARCHS = {
    "ncsn": dict(stages=((1, 1), (2, 1), (2, 2), (2, 4)), refine=(2, 2, 2, 1)),
    "ncsnv2_64": dict(stages=((1, 1), (2, 1), (2, 2), (2, 4)), refine=(2, 2, 2, 1)),
    "ncsnv2_128": dict(stages=((1, 1), (2, 1), (2, 1), (4, 2), (4, 4)),
                       refine=(4, 2, 2, 1, 1)),
    "ncsnv2_256": dict(stages=((1, 1), (2, 1), (2, 1), (2, 1), (4, 2), (4, 4)),
                       refine=(4, 2, 2, 2, 1, 1)),
}


class _NCSNBase(nn.Module):
    """Fields shared by the NCSN family.

    nf: base width. num_scales: number of noise levels (NCSN's conditional normalizations
      get one embedding row per level; labels lie in [0, num_scales)).
    normalization: 'InstanceNorm++' (NCSN needs it: the conditional variant), 'InstanceNorm',
      'VarianceNorm' or 'GroupNorm'. nonlinearity: 'elu', 'relu', 'lrelu' or 'swish'.
    interpolation: upsampling in the RefineNet decoder ('bilinear' or 'nearest').
    centered: inputs already in [-1, 1]. scale_by_sigma: divide the output by sigmas[label].
    sigmas: the noise levels from sigma_max down [num_scales]; needed for scale_by_sigma.
    """

    num_scales: int
    nf: int = 128
    normalization: str = "InstanceNorm++"
    nonlinearity: str = "elu"
    interpolation: str = "bilinear"
    centered: bool = False
    scale_by_sigma: bool = True
    sigmas: tuple[float, ...] | None = None

    _arch = "ncsnv2_64"
    _conditional = False

    @nn.compact
    def __call__(self, x, labels, train: bool = False):
        """x [B, H, W, C], labels [B] noise-level indices -> [B, H, W, C]."""
        del train  # No dropout or batch statistics in these networks.
        if self.scale_by_sigma and (self.sigmas is None or len(self.sigmas) != self.num_scales):
            got = None if self.sigmas is None else f"{len(self.sigmas)} levels"
            raise ValueError(f"{type(self).__name__} with scale_by_sigma needs sigmas with "
                             f"num_scales={self.num_scales} noise levels; got {got}.")
        return _refinenet(self, x, labels)


def _refinenet(net: _NCSNBase, x, labels):
    """Shared forward pass; must be called inside a compact __call__."""
    nf = net.nf
    act = get_act(net.nonlinearity)
    conditional = net._conditional
    norm = get_normalization(net.normalization, conditional=conditional,
                             num_classes=net.num_scales)
    interpolation = net.interpolation
    arch = net._arch
    spec = _ARCHS[arch]
    y = _label_index(labels)

    if conditional:
        res_block = lambda h, c, resample, dilation: ConditionalResidualBlock(
            c, norm, resample=resample, act=act, dilation=dilation)(h, y)
        refine_block = lambda hs, shape, c, start, end: CondRefineBlock(
            shape, c, norm, act=act, interpolation=interpolation, start=start, end=end)(hs, y)
        normalize = lambda h: norm()(h, y)
    else:
        res_block = lambda h, c, resample, dilation: ResidualBlock(
            c, norm, resample=resample, act=act, dilation=dilation)(h)
        refine_block = lambda hs, shape, c, start, end: RefineBlock(
            shape, c, act=act, interpolation=interpolation, start=start, end=end)(hs)
        normalize = lambda h: norm()(h)

    h = x if net.centered else 2.0 * x - 1.0
    h = ncsn_conv3x3(h, nf, stride=1, bias=True)

    layers = []
    for i, (mult, dilation) in enumerate(spec["stages"]):
        h = res_block(h, mult * nf, None if i == 0 else "down", dilation)
        h = res_block(h, mult * nf, None, dilation)
        layers.append(h)

    # RefineNet decoder from the deepest stage back to the first; each block fuses a
    # backbone feature map with the previous refinement at the former's resolution.
    n = len(layers)
    ref = None
    for k, (layer, mult) in enumerate(zip(reversed(layers), spec["refine"], strict=True)):
        inputs = [layer] if ref is None else [layer, ref]
        ref = refine_block(inputs, layer.shape[1:3], mult * nf, k == 0, k == n - 1)

    h = act(normalize(ref))
    h = ncsn_conv3x3(h, x.shape[-1])

    if net.scale_by_sigma:
        sigmas = jnp.asarray(net.sigmas, dtype=h.dtype)
        h = h / sigmas[y][:, None, None, None]
    return h


@register_model(name="ncsn")
class NCSN(_NCSNBase):
    """NCSN v1: noise-conditional RefineNet with conditional InstanceNorm++ (one table row
    per noise level, num_scales rows); the paper's NCSN does not scale by sigma."""

    scale_by_sigma: bool = False

    _arch = "ncsn"
    _conditional = True


@register_model(name="ncsnv2_64")
class NCSNv2(_NCSNBase):
    """NCSNv2 for images up to 64 px (CIFAR-10, CelebA 64)."""

    _arch = "ncsnv2_64"


@register_model(name="ncsnv2_128")
class NCSNv2_128(_NCSNBase):
    """NCSNv2 for 96-128 px images (one more down-sampling stage)."""

    _arch = "ncsnv2_128"


@register_model(name="ncsnv2_256")
class NCSNv2_256(_NCSNBase):
    """NCSNv2 for 256 px images (LSUN bedroom, church; two more down-sampling stages)."""

    _arch = "ncsnv2_256"
