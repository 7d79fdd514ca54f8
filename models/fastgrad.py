"""Formulations of the networks' products and dropout that XLA:CPU runs faster than the
plain ones, with the same results.

Measured on the CIFAR-10 NCSN++ train step (batch 8, 2 CPU cores) with XLA's per-operation
profile, the plain formulations lose time in four places, each fixed here:

* `channel_dense(x, w, b)`: a per-pixel dense layer over the channel axis (NIN, the attention
  projections, and 1x1 convolutions), x [..., C] @ w [C, D] + b [D]. Autodiff's weight
  gradient contracts the flattened pixels of x [P, C] and of the cotangent g [P, D] over P;
  XLA:CPU then transposes g inside the large fusion that produces it (GroupNorm and skip
  gradients of several layers), which it evaluates in a cache-hostile order (0.03-0.08 s per
  attention projection at 16x16). Here the tangent rule of the product is written by hand:
  the weight tangent's product uses x transposed and materialized, x^T [C, P], so the
  transposed weight gradient is the plain matrix product x^T g, and the tangent of the
  output is materialized (`_materialized`), which transposed materializes g as its producer
  computes it. As a 1x1 convolution it also replaces XLA's 1x1 convolution kernels, whose
  weight gradient ran at a quarter of the 3x3 convolutions' FLOP rate.
* `conv_general_dilated`: XLA's convolution with its output's cotangent materialized the same
  way, so that the transposing copy of g ([H, W, B, C_out]) that XLA's weight gradient makes
  and the input gradient read one computed g. (Measured against the optimization barrier that
  XLA:CPU drops: no difference in step time; the residual sums below are where it pays.)
* `cotangent_barrier`, on the residual sums of the NCSN++/DDPM++ blocks: the cotangent of a
  block's output is an elementwise chain through the later blocks' skips, and XLA:CPU fused
  (and recomputed) that chain, up to twelve blocks deep, into each of its consumers: 0.38 s
  of a 5.6 s step in fusions of 40-117 operands, one of them 0.14 s. Materialized once per
  block: 7% less time per step (4.09 vs 4.42 s, interleaved in one process) and 58 MB less
  of XLA's temporaries (906 vs 964 MiB).
* `dropout`: the keep mask from 16-bit halves of the random words (one threefry word per two
  elements instead of one per element, and no float conversion): the drop probability is
  rounded to a multiple of 2^-16 (0.1 becomes 0.1000061) and kept values are scaled by
  1 / (1 - that probability), so the expectation is unchanged.

The transposed copies of x are kept from the forward to the backward pass (for the CIFAR-10
NCSN++ at batch 8, 55 MB more of XLA's temporary buffers) and the materialized cotangents
can coexist in the backward pass; both work against rematerialization, so rematerialized blocks
(config.training.remat) trace with the plain formulations (`disabled()`).

Everything is written as custom JVPs, not VJPs, so forward-mode autodiff (the likelihood's
divergence, any `jax.jvp` through a network) works as for the plain layers. The results equal
plain autodiff's up to float32 summation order (tests/test_perf.py); `disabled()` switches
the products back to the plain formulations, e.g. to compare.

XLA's 3x3 weight gradient itself is kept: measured per layer shape (benchmarks/
conv_grad_probe.py), every matmul-based formulation (im2col, 9 shifted matmuls, 3 row-shifted
matmuls, flat contiguous taps) was 1.2-2.5x slower than XLA's YNNPACK kernels (jax 0.10).
"""

from __future__ import annotations

import contextlib
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from models import precision as precision_lib

_STATE = {"enabled": True}


@contextlib.contextmanager
def disabled():
    """Within this block, networks traced use the plain formulations (autodiff's gradients)."""
    previous, _STATE["enabled"] = _STATE["enabled"], False
    try:
        yield
    finally:
        _STATE["enabled"] = previous


def enabled() -> bool:
    return _STATE["enabled"]


def _materialized(t, y):
    """`t`, computed into a buffer of its own and read from there by all its consumers.

    XLA:CPU expands `lax.optimization_barrier` before fusion, so the barrier does not stop a
    chain of elementwise operations from being fused (and recomputed) into each consumer.
    A conditional does: its operand is computed before it runs. The predicate (`y`'s first
    element is NaN) is unknown at compile time and both branches return `t` (the second as
    t * 1.0, so that the two branches differ and the conditional is kept), so the value is
    `t` whichever branch runs. Other backends keep the barrier.
    """
    if jax.default_backend() != "cpu":
        return lax.optimization_barrier(t)
    return lax.cond(jnp.isnan(y.reshape(-1)[0]), lambda t: t, lambda t: t * 1.0, t)


@jax.custom_jvp
def _cotangent_barrier(y):
    """The identity, whose tangent, and so (transposed) whose cotangent, is materialized."""
    return y


@_cotangent_barrier.defjvp
def _cotangent_barrier_jvp(primals, tangents):
    y, t = primals[0], tangents[0]
    return y, _materialized(t, y)


def cotangent_barrier(y):
    """The identity; in reverse mode its cotangent is computed once, into a buffer.

    For residual sums (x + h) / sqrt(2): the cotangent of a block's output sums every later
    use of it (the next block's skip and GroupNorm backward, the U-Net skip connections), all
    elementwise, and without the barrier XLA:CPU fused that whole chain, through up to twelve
    blocks, into each of its consumers (the convolutions' weight-gradient transposes, the
    GroupNorm reductions), recomputing it per consumer.
    """
    return _cotangent_barrier(y) if enabled() else y


def _dense_product(x, w, precision):
    return precision_lib.einsum("...c,cd->...d", x, w, precision)


def _make_channel_product(precision: str):
    @jax.custom_jvp
    def product(x, w):
        return _dense_product(x, w, precision)

    def product_jvp(primals, tangents):
        x, w = primals
        dx, dw = tangents
        y = product(x, w)
        terms = []
        if not isinstance(dx, SymbolicZero):
            terms.append(_dense_product(dx, w, precision))
        if not isinstance(dw, SymbolicZero):
            # x^T [C, P], materialized: transposed, this term is the plain product x^T g.
            xt = lax.optimization_barrier(x.reshape(-1, x.shape[-1]).T)
            terms.append(_dense_product(xt.T, dw, precision).reshape(y.shape))
        if not terms:
            return y, SymbolicZero(jax.core.get_aval(y).to_tangent_aval())
        return y, sum(terms[1:], terms[0])

    product.defjvp(product_jvp, symbolic_zeros=True)
    return product


_CHANNEL_PRODUCTS = {p: _make_channel_product(p) for p in precision_lib.PRECISIONS}


def _fast_channel_product(x, w, precision):
    return _cotangent_barrier(_CHANNEL_PRODUCTS[precision](x, w))


def channel_dense(x, w, b, precision: str = "float32"):
    """x [..., C] @ w [C, D] + b [D] -> [..., D] (float32), products in `precision`."""
    if not enabled():
        return _dense_product(x, w, precision) + b
    return _fast_channel_product(x, w, precision) + b


def conv_fn(precision: str):
    """A drop-in `lax.conv_general_dilated` (for `nn.Conv(conv_general_dilated=...)`) with
    the gradient formulations above; products in `precision`."""
    plain = precision_lib.conv_fn(precision)

    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, **kwargs):
        if not enabled():
            return plain(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                         dimension_numbers, feature_group_count, **kwargs)
        if _is_pointwise(lhs, rhs, window_strides, padding, lhs_dilation, dimension_numbers,
                         feature_group_count):
            return _fast_channel_product(lhs, rhs.reshape(rhs.shape[-2:]), precision)
        return _cotangent_barrier(plain(lhs, rhs, window_strides, padding, lhs_dilation,
                                        rhs_dilation, dimension_numbers, feature_group_count,
                                        **kwargs))

    return conv


def _is_pointwise(lhs, rhs, window_strides, padding, lhs_dilation, dimension_numbers,
                  feature_group_count) -> bool:
    """Whether the convolution is a channel product: a 1x1 kernel, stride 1, no padding or
    input dilation, one group, NHWC x HWIO -> NHWC (flax's layout)."""
    n = lhs.ndim
    ones = (1,) * (n - 2)
    channels_last = lax.ConvDimensionNumbers(lhs_spec=(0, n - 1, *range(1, n - 1)),
                                             rhs_spec=(n - 1, n - 2, *range(n - 2)),
                                             out_spec=(0, n - 1, *range(1, n - 1)))
    return (rhs.shape[:-2] == ones and tuple(window_strides) == ones
            and tuple(lhs_dilation or ones) == ones and feature_group_count == 1
            and (isinstance(padding, str) or all(tuple(p) == (0, 0) for p in padding))
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == channels_last)


def dropout(x, rate: float, rng):
    """Inverted dropout of `x` with drop probability `rate` rounded to a multiple of 2^-16.

    A forward computation, not a gradient formulation: `disabled()` leaves it as it is.
    """
    threshold = round(rate * 65536)
    n = math.prod(x.shape)
    words = jax.random.bits(rng, ((n + 1) // 2,), jnp.uint32)
    halves = jnp.concatenate([words & 0xFFFF, words >> 16])[:n].reshape(x.shape)
    keep = halves >= jnp.uint32(threshold)
    return jnp.where(keep, x * (65536 / (65536 - threshold)), 0.0).astype(x.dtype)
