"""NCSN (v1) and NCSNv2 score networks: RefineNets on a dilated ResNet backbone.

NCSN (Song & Ermon 2019) is noise-conditional: every normalization is a conditional
InstanceNorm++ indexed by the noise level. NCSNv2 (Song & Ermon 2020) is unconditional and
instead divides its output by the noise level sigma of each example (`scale_by_sigma`),
using the geometric sigmas of `get_sigmas`.

Both are applied as `model.apply(variables, x [B, H, W, C], labels [B], train)` and return
[B, H, W, C]. `labels` are integer noise-level indices into `get_sigmas(config)` (index 0 is
sigma_max): the discrete VE convention of the paper. Float labels are rounded.

Data in [0, 1] (config.data.centered False) are mapped to [-1, 1] first, as in the
reference.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from models.layers import (
    ConditionalResidualBlock,
    CondRefineBlock,
    RefineBlock,
    ResidualBlock,
    get_act,
    ncsn_conv3x3,
)
from models.normalization import get_normalization
from models.utils import get_sigmas, register_model


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


def _refinenet(config, arch: str, x, labels, conditional: bool):
    """Shared forward pass; must be called inside a compact __call__."""
    nf = config.model.nf
    act = get_act(config)
    norm = get_normalization(config, conditional=conditional)
    interpolation = config.model.get("interpolation", "bilinear")
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

    h = x if config.data.centered else 2.0 * x - 1.0
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

    if config.model.scale_by_sigma:
        sigmas = jnp.asarray(get_sigmas(config), dtype=h.dtype)
        h = h / sigmas[y][:, None, None, None]
    return h


class _NCSNBase(nn.Module):
    config: ml_collections.ConfigDict

    _arch = "ncsnv2_64"
    _conditional = False

    @nn.compact
    def __call__(self, x, labels, train: bool = False):
        """x [B, H, W, C], labels [B] noise-level indices -> [B, H, W, C]."""
        del train  # No dropout or batch statistics in these networks.
        return _refinenet(self.config, self._arch, x, labels, self._conditional)


@register_model(name="ncsn")
class NCSN(_NCSNBase):
    """NCSN v1: noise-conditional RefineNet with conditional InstanceNorm++ (one table row
    per noise level; config.model.num_classes, default num_scales)."""

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
