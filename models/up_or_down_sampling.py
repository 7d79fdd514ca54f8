"""FIR-filtered resampling of images (StyleGAN2's upfirdn2d) in pure JAX, NHWC.

`upfirdn2d(x, k, up, down, pad)` is the primitive: insert `up - 1` zeros after every pixel,
pad (negative padding crops), convolve with the 2-D FIR filter `k` (a true convolution, i.e.
the filter is flipped), and keep every `down`-th pixel. Zero insertion, padding and cropping
are one `lax.pad` (interior padding); filtering and decimation with a constant filter are a
weighted sum of strided shifted views (two 1-D passes for separable filters), which XLA fuses
into one elementwise loop on CPU and GPU alike.

FIR kernels are normalized to sum to one (times factor**2 when upsampling, because zero
insertion leaves only one in factor**2 pixels non-zero), so constant images stay constant
away from the zero-padded borders.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from models import precision as precision_lib

_NHWC = ("NHWC", "HWIO", "NHWC")


def setup_kernel(k: Sequence[float] | np.ndarray) -> np.ndarray:
    """A 1-D (separable) or 2-D filter as a square 2-D float32 array normalized to sum 1."""
    k = np.asarray(k, dtype=np.float32)
    if k.ndim == 1:
        k = np.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"FIR kernel must be 1-D or square 2-D, got shape {k.shape}.")
    return k / np.sum(k)


def upfirdn2d(x, k, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)):
    """Upsample by zero insertion, pad, FIR-filter and downsample.

    Args:
      x: [N, H, W, C] images.
      k: [kH, kW] filter (used as given, no normalization). Applied as a convolution.
      up, down: integer factors, the same for both spatial axes.
      pad: (before, after) padding applied to both spatial axes after zero insertion;
        negative values crop.

    Returns:
      [N, (H * up + pad0 + pad1 - kH) // down + 1, (same for W), C].
    """
    p0, p1 = pad
    zero = jnp.zeros((), x.dtype)
    # Interior padding inserts up-1 zeros between pixels; the extra up-1 after the last pixel
    # makes the upsampled length exactly H * up, as in StyleGAN2's reference implementation.
    x = lax.pad(x, zero, [(0, 0, 0), (p0, p1 + up - 1, up - 1), (p0, p1 + up - 1, up - 1),
                          (0, 0, 0)])
    try:
        k_np = np.asarray(k, dtype=np.float64)
    except jax.errors.TracerArrayConversionError:
        k_np = None
    if k_np is None:
        # A traced filter: one depthwise convolution (flipped, since lax correlates).
        kt = jnp.asarray(k, x.dtype)
        c = x.shape[-1]
        w = jnp.tile(kt[::-1, ::-1][:, :, None, None], (1, 1, 1, c))
        return lax.conv_general_dilated(x, w, window_strides=(down, down), padding="VALID",
                                        dimension_numbers=_NHWC, feature_group_count=c)
    # A constant filter (always the case in the networks): a weighted sum of a few strided
    # shifted views. XLA fuses it into one elementwise loop, and its gradient is as cheap,
    # whereas grouped convolutions are slow on CPU. Separable filters take two 1-D passes.
    col, row = _rank_one_factors(k_np)
    if col is not None:
        x = _fir_1d(x, col, axis=1, down=down)
        return _fir_1d(x, row, axis=2, down=down)
    return _fir_2d(x, k_np, down)


def _rank_one_factors(k):
    """(col, row) with k == outer(col, row) if k has rank one, else (None, None)."""
    i, j = np.unravel_index(np.argmax(np.abs(k)), k.shape)
    col, row = k[:, j], k[i, :] / k[i, j]
    if np.allclose(np.outer(col, row), k, rtol=1e-6, atol=1e-12 * np.abs(k).max()):
        return col, row
    return None, None


def _fir_1d(x, taps, axis: int, down: int):
    """out[i] = sum_a taps[K - 1 - a] x[i * down + a] along `axis` (a 'VALID' convolution)."""
    n_out = (x.shape[axis] - len(taps)) // down + 1
    out = None
    for a, c in enumerate(taps[::-1]):
        if c == 0:
            continue
        view = lax.slice_in_dim(x, a, a + (n_out - 1) * down + 1, stride=down, axis=axis)
        term = view * jnp.asarray(c, x.dtype)
        out = term if out is None else out + term
    if out is None:  # an all-zero filter
        shape = list(x.shape)
        shape[axis] = n_out
        out = jnp.zeros(shape, x.dtype)
    return out


def _fir_2d(x, k, down: int):
    kh, kw = k.shape
    n_h = (x.shape[1] - kh) // down + 1
    n_w = (x.shape[2] - kw) // down + 1
    out = jnp.zeros((x.shape[0], n_h, n_w, x.shape[3]), x.dtype)
    kf = k[::-1, ::-1]
    for a in range(kh):
        for b in range(kw):
            if kf[a, b] == 0:
                continue
            view = lax.slice(x, (0, a, b, 0),
                             (x.shape[0], a + (n_h - 1) * down + 1, b + (n_w - 1) * down + 1,
                              x.shape[3]), (1, down, down, 1))
            out = out + view * jnp.asarray(kf[a, b], x.dtype)
    return out


def upsample_2d(x, k: Sequence[float] | None = None, factor: int = 2, gain: float = 1.0):
    """Upsamples [N, H, W, C] to [N, H * factor, W * factor, C] with FIR filter `k`.

    The default `k` = [1] * factor is nearest-neighbour upsampling.
    """
    _check_factor(factor)
    k = setup_kernel([1] * factor if k is None else k) * (gain * factor**2)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x, k: Sequence[float] | None = None, factor: int = 2, gain: float = 1.0):
    """Downsamples [N, H, W, C] to [N, H // factor, W // factor, C] with FIR filter `k`.

    The default `k` = [1] * factor is average pooling.
    """
    _check_factor(factor)
    k = setup_kernel([1] * factor if k is None else k) * gain
    p = k.shape[0] - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x, w, k: Sequence[float] | None = None, factor: int = 2,
                     gain: float = 1.0, conv: Callable = lax.conv_general_dilated):
    """Fused `upsample_2d` followed by a 'SAME' convolution with `w` [kH, kW, Cin, Cout].

    A transposed convolution does the zero insertion and the convolution at once; the FIR
    filter then runs on the (slightly larger) result with padding chosen so the output equals
    the unfused composition. Returns [N, H * factor, W * factor, Cout].
    """
    _check_factor(factor)
    ch, cw = w.shape[0], w.shape[1]
    if ch != cw:
        raise ValueError(f"Convolution kernel must be square, got {w.shape[:2]}.")
    k = setup_kernel([1] * factor if k is None else k) * (gain * factor**2)
    p = (k.shape[0] - factor) - (cw - 1)
    # Stride-`factor` transposed convolution == correlation of the zero-inserted input (fully
    # padded) with the kernel; output size (H - 1) * factor + kH.
    x = conv(x, w.astype(x.dtype), window_strides=(1, 1),
                                 padding=[(ch - 1, ch - 1), (cw - 1, cw - 1)],
                                 lhs_dilation=(factor, factor), dimension_numbers=_NHWC)
    return upfirdn2d(x, k, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x, w, k: Sequence[float] | None = None, factor: int = 2,
                       gain: float = 1.0, conv: Callable = lax.conv_general_dilated):
    """Fused 'SAME' convolution with `w` [kH, kW, Cin, Cout] followed by `downsample_2d`.

    The FIR filter runs first (padding once for both ops), then a stride-`factor` 'VALID'
    convolution. Returns [N, H // factor, W // factor, Cout].
    """
    _check_factor(factor)
    ch, cw = w.shape[0], w.shape[1]
    if ch != cw:
        raise ValueError(f"Convolution kernel must be square, got {w.shape[:2]}.")
    k = setup_kernel([1] * factor if k is None else k) * gain
    p = (k.shape[0] - factor) + (cw - 1)
    x = upfirdn2d(x, k, pad=((p + 1) // 2, p // 2))
    return conv(x, w.astype(x.dtype), window_strides=(factor, factor),
                                    padding="VALID", dimension_numbers=_NHWC)


def naive_upsample_2d(x, factor: int = 2):
    """Nearest-neighbour upsampling of [N, H, W, C] by an integer factor."""
    n, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, factor, w, factor, c))
    return x.reshape(n, h * factor, w * factor, c)


def naive_downsample_2d(x, factor: int = 2):
    """Average pooling of [N, H, W, C] over non-overlapping factor x factor blocks."""
    n, h, w, c = x.shape
    return x.reshape(n, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))


def _check_factor(factor):
    if not isinstance(factor, int) or factor < 1:
        raise ValueError(f"Resampling factor must be a positive integer, got {factor!r}.")


class Conv2d(nn.Module):
    """Square 'SAME' convolution with optional FIR upsampling or downsampling (StyleGAN2).

    Parameters: `kernel` [k, k, Cin, fmaps] and, with `use_bias`, `bias` [fmaps] (zeros).
    Input [N, H, W, Cin]; output [N, H', W', fmaps] with H' = 2H (up), H // 2 (down) or H.
    """

    fmaps: int
    kernel: int
    up: bool = False
    down: bool = False
    resample_kernel: tuple[int, ...] = (1, 3, 3, 1)
    use_bias: bool = True
    kernel_init: Callable | None = None
    precision: str = "float32"  # of the convolution's products (models.precision)

    @nn.compact
    def __call__(self, x):
        if self.up and self.down:
            raise ValueError("Conv2d cannot both upsample and downsample.")
        if self.kernel < 1 or self.kernel % 2 != 1:
            raise ValueError(f"Conv2d kernel size must be odd and positive, got {self.kernel}.")
        init = self.kernel_init or nn.initializers.lecun_normal()
        w = self.param("kernel", init, (self.kernel, self.kernel, x.shape[-1], self.fmaps))
        conv = precision_lib.conv_fn(self.precision)
        if self.up:
            x = upsample_conv_2d(x, w, k=self.resample_kernel, conv=conv)
        elif self.down:
            x = conv_downsample_2d(x, w, k=self.resample_kernel, conv=conv)
        else:
            x = conv(x, w.astype(x.dtype), window_strides=(1, 1),
                                         padding="SAME", dimension_numbers=_NHWC)
        if self.use_bias:
            b = self.param("bias", nn.initializers.zeros, (self.fmaps,))
            x = x + b.astype(x.dtype)
        return x


__all__ = [
    "Conv2d", "conv_downsample_2d", "downsample_2d", "naive_downsample_2d",
    "naive_upsample_2d", "setup_kernel", "upfirdn2d", "upsample_2d", "upsample_conv_2d",
]
