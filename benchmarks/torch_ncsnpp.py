"""A PyTorch NCSN++ for side-by-side benchmarks, written from the paper's description (Song et
al. 2021, App. H) with the layer shapes of the public PyTorch port (yang-song/score_sde_pytorch,
`models/ncsnpp.py`, `layerspp.py`, `up_or_down_sampling.py`), so that its parameter count equals
the reference's (62,758,915 for CIFAR-10 NCSN++ continuous, VE).

Only what the CIFAR-10 NCSN++ / DDPM++ configs use is implemented: BigGAN residual blocks,
FIR resampling with the port's native `upfirdn2d` (a depthwise convolution over N * C
single-channel images, as the port does without its CUDA kernel), DDPM attention, Fourier or
positional embeddings, and the `none` / `residual` input pyramids. Tensors are NCHW.

It is a benchmark peer, not a library module: it imports torch at the top.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _variance_scaling_uniform(shape, scale, fan_in, fan_out):
    scale = 1e-10 if scale == 0 else scale
    limit = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    return (torch.rand(shape) * 2.0 - 1.0) * limit


def _conv(in_ch, out_ch, k, init_scale=1.0, stride=1, padding=None):
    padding = k // 2 if padding is None else padding
    conv = nn.Conv2d(in_ch, out_ch, k, stride=stride, padding=padding)
    with torch.no_grad():
        conv.weight.copy_(_variance_scaling_uniform(conv.weight.shape, init_scale,
                                                    in_ch * k * k, out_ch * k * k))
        conv.bias.zero_()
    return conv


def _dense(in_f, out_f, init_scale=1.0):
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.copy_(_variance_scaling_uniform(lin.weight.shape, init_scale, in_f, out_f))
        lin.bias.zero_()
    return lin


def _group_norm(ch):
    return nn.GroupNorm(min(ch // 4, 32), ch, eps=1e-6)


# --- FIR resampling (StyleGAN2's upfirdn2d, native PyTorch path) -------------------------

def upfirdn2d(x, kernel, up=1, down=1, pad=(0, 0)):
    """x [N, C, H, W]; the same factors and padding on both axes."""
    n, c, h, w = x.shape
    kh, kw = kernel.shape
    out = x.reshape(-1, h, 1, w, 1, 1)
    out = F.pad(out, [0, 0, 0, up - 1, 0, 0, 0, up - 1])
    out = out.reshape(-1, h * up, w * up, 1)
    p0, p1 = pad
    out = F.pad(out, [0, 0, max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    out = out.permute(0, 3, 1, 2).reshape(-1, 1, h * up + p0 + p1, w * up + p0 + p1)
    weight = torch.flip(kernel, [0, 1]).view(1, 1, kh, kw)
    out = F.conv2d(out, weight)
    out = out.reshape(-1, 1, h * up + p0 + p1 - kh + 1, w * up + p0 + p1 - kw + 1)
    out = out.permute(0, 2, 3, 1)[:, ::down, ::down, :]
    return out.reshape(n, c, out.shape[1], out.shape[2])


def _fir_kernel(k, gain):
    k = np.asarray(k, np.float32)
    k = np.outer(k, k)
    return torch.tensor(k / k.sum() * gain)


def upsample_2d(x, k, factor=2):
    kernel = _fir_kernel(k, factor ** 2)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x, k, factor=2):
    kernel = _fir_kernel(k, 1.0)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


class FIRConvDown(nn.Module):
    """'SAME' 3x3 convolution fused with FIR 2x downsampling (the residual input pyramid)."""

    def __init__(self, in_ch, out_ch, fir_kernel):
        super().__init__()
        self.weight = nn.Parameter(_variance_scaling_uniform((out_ch, in_ch, 3, 3), 1.0,
                                                             in_ch * 9, out_ch * 9))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.register_buffer("kernel", _fir_kernel(fir_kernel, 1.0), persistent=False)

    def forward(self, x):
        p = (self.kernel.shape[0] - 2) + 2
        x = upfirdn2d(x, self.kernel, pad=((p + 1) // 2, p // 2))
        return F.conv2d(x, self.weight, stride=2) + self.bias[None, :, None, None]


# --- Blocks --------------------------------------------------------------------------------

class ResnetBlockBigGAN(nn.Module):
    def __init__(self, act, in_ch, out_ch=None, temb_dim=None, up=False, down=False,
                 dropout=0.1, fir=True, fir_kernel=(1, 3, 3, 1), skip_rescale=True,
                 init_scale=0.0):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = _group_norm(in_ch)
        self.Conv_0 = _conv(in_ch, out_ch, 3)
        self.Dense_0 = _dense(temb_dim, out_ch) if temb_dim is not None else None
        self.GroupNorm_1 = _group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv(out_ch, out_ch, 3, init_scale=init_scale)
        self.Conv_2 = _conv(in_ch, out_ch, 1) if (in_ch != out_ch or up or down) else None
        self.act, self.up, self.down, self.fir = act, up, down, fir
        self.fir_kernel, self.skip_rescale = fir_kernel, skip_rescale

    def forward(self, x, temb=None):
        h = self.act(self.GroupNorm_0(x))
        if self.up:
            if self.fir:
                h, x = upsample_2d(h, self.fir_kernel), upsample_2d(x, self.fir_kernel)
            else:
                h, x = F.interpolate(h, scale_factor=2.0), F.interpolate(x, scale_factor=2.0)
        elif self.down:
            if self.fir:
                h, x = downsample_2d(h, self.fir_kernel), downsample_2d(x, self.fir_kernel)
            else:
                h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.act(self.GroupNorm_1(h))
        h = self.Conv_1(self.Dropout_0(h))
        if self.Conv_2 is not None:
            x = self.Conv_2(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class NIN(nn.Module):
    def __init__(self, in_dim, num_units, init_scale=0.1):
        super().__init__()
        self.W = nn.Parameter(_variance_scaling_uniform((in_dim, num_units), init_scale,
                                                        in_dim, num_units))
        self.b = nn.Parameter(torch.zeros(num_units))

    def forward(self, x):  # [B, C, H, W]
        return torch.einsum("bchw,cd->bdhw", x, self.W) + self.b[None, :, None, None]


class AttnBlockpp(nn.Module):
    def __init__(self, channels, skip_rescale=True, init_scale=0.0):
        super().__init__()
        self.GroupNorm_0 = _group_norm(channels)
        self.NIN_0, self.NIN_1, self.NIN_2 = (NIN(channels, channels) for _ in range(3))
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x):
        b, c, hh, ww = x.shape
        h = self.GroupNorm_0(x)
        q, k, v = self.NIN_0(h), self.NIN_1(h), self.NIN_2(h)
        w = torch.einsum("bchw,bcij->bhwij", q, k) * (int(c) ** (-0.5))
        w = torch.softmax(w.reshape(b, hh, ww, hh * ww), dim=-1).reshape(b, hh, ww, hh, ww)
        h = self.NIN_3(torch.einsum("bhwij,bcij->bchw", w, v))
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class GaussianFourierProjection(nn.Module):
    def __init__(self, embedding_size, scale):
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, x):
        x_proj = x[:, None] * self.W[None, :] * 2 * np.pi
        return torch.cat([torch.sin(x_proj), torch.cos(x_proj)], dim=-1)


def _timestep_embedding(t, dim, max_positions=10000):
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(max_positions)
                                                                  / (half - 1)))
    emb = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)


class NCSNpp(nn.Module):
    """NCSN++ / DDPM++ with BigGAN blocks; `m` is an ml_collections config.model-like object
    (attributes nf, ch_mult, num_res_blocks, attn_resolutions, dropout, fir, fir_kernel,
    skip_rescale, init_scale, progressive_input, embedding_type, fourier_scale,
    scale_by_sigma), `image_size`, `channels` and `centered` describe the data."""

    def __init__(self, m, image_size=32, channels=3, centered=False):
        super().__init__()
        if m.resblock_type != "biggan" or m.progressive != "none":
            raise ValueError("torch_ncsnpp implements resblock_type='biggan' with "
                             f"progressive='none'; got {m.resblock_type!r}, {m.progressive!r}.")
        if m.progressive_input not in ("none", "residual"):
            raise ValueError(f"progressive_input={m.progressive_input!r}; implemented: "
                             "['none', 'residual'].")
        self.act = nn.SiLU()
        self.m, self.centered = m, centered
        nf, ch_mult = m.nf, tuple(m.ch_mult)
        self.num_resolutions = len(ch_mult)
        self.resolutions = [image_size // 2 ** i for i in range(self.num_resolutions)]
        fir_kernel = tuple(m.fir_kernel)
        block = lambda **kw: ResnetBlockBigGAN(self.act, temb_dim=4 * nf, dropout=m.dropout,
                                               fir=m.fir, fir_kernel=fir_kernel,
                                               skip_rescale=m.skip_rescale,
                                               init_scale=m.init_scale, **kw)
        attn = lambda ch: AttnBlockpp(ch, skip_rescale=m.skip_rescale, init_scale=m.init_scale)
        if m.embedding_type == "fourier":
            self.fourier = GaussianFourierProjection(nf, m.fourier_scale)
        self.temb0, self.temb1 = _dense(2 * nf, 4 * nf), _dense(4 * nf, 4 * nf)
        self.conv_in = _conv(channels, nf, 3)
        self.down = nn.ModuleList()
        hs_c, in_ch, pyramid_ch = [nf], nf, channels
        for i_level in range(self.num_resolutions):
            level = nn.ModuleDict()
            level["blocks"] = nn.ModuleList()
            level["attn"] = nn.ModuleList()
            for _ in range(m.num_res_blocks):
                out_ch = nf * ch_mult[i_level]
                level["blocks"].append(block(in_ch=in_ch, out_ch=out_ch))
                in_ch = out_ch
                if self.resolutions[i_level] in m.attn_resolutions:
                    level["attn"].append(attn(in_ch))
                hs_c.append(in_ch)
            if i_level != self.num_resolutions - 1:
                level["downsample"] = block(in_ch=in_ch, down=True)
                if m.progressive_input == "residual":
                    level["pyramid"] = FIRConvDown(pyramid_ch, in_ch, fir_kernel)
                    pyramid_ch = in_ch
                hs_c.append(in_ch)
            self.down.append(level)
        self.mid = nn.ModuleList([block(in_ch=in_ch), attn(in_ch), block(in_ch=in_ch)])
        self.up = nn.ModuleList()
        for i_level in reversed(range(self.num_resolutions)):
            level = nn.ModuleDict()
            level["blocks"] = nn.ModuleList()
            for _ in range(m.num_res_blocks + 1):
                out_ch = nf * ch_mult[i_level]
                level["blocks"].append(block(in_ch=in_ch + hs_c.pop(), out_ch=out_ch))
                in_ch = out_ch
            if self.resolutions[i_level] in m.attn_resolutions:
                level["attn"] = attn(in_ch)
            if i_level != 0:
                level["upsample"] = block(in_ch=in_ch, up=True)
            self.up.append(level)
        assert not hs_c
        self.norm_out = _group_norm(in_ch)
        self.conv_out = _conv(in_ch, channels, 3, init_scale=m.init_scale)

    def forward(self, x, time_cond):
        m = self.m
        if m.embedding_type == "fourier":
            temb = self.fourier(torch.log(time_cond))
        else:
            temb = _timestep_embedding(time_cond, m.nf)
        temb = self.temb1(self.act(self.temb0(temb)))
        if not self.centered:
            x = 2 * x - 1.0
        pyramid = x
        hs = [self.conv_in(x)]
        for level in self.down:
            for i_block, blk in enumerate(level["blocks"]):
                h = blk(hs[-1], temb)
                if len(level["attn"]):
                    h = level["attn"][i_block](h)
                hs.append(h)
            if "downsample" in level:
                h = level["downsample"](hs[-1], temb)
                if "pyramid" in level:
                    pyramid = level["pyramid"](pyramid)
                    pyramid = (pyramid + h) / math.sqrt(2.0) if m.skip_rescale else pyramid + h
                    h = pyramid
                hs.append(h)
        h = self.mid[0](hs[-1], temb)
        h = self.mid[2](self.mid[1](h), temb)
        for level in self.up:
            for blk in level["blocks"]:
                h = blk(torch.cat([h, hs.pop()], dim=1), temb)
            if "attn" in level:
                h = level["attn"](h)
            if "upsample" in level:
                h = level["upsample"](h, temb)
        h = self.conv_out(self.act(self.norm_out(h)))
        if m.scale_by_sigma:
            h = h / time_cond.reshape(-1, 1, 1, 1)
        return h


def count_params(module: nn.Module) -> int:
    """All parameters, including fixed ones (the reference counts the Fourier weights)."""
    return sum(p.numel() for p in module.parameters())
