"""The XLA:CPU backend: formulations of the networks' products and dropout that XLA:CPU runs
faster than the plain ones (with the same results), its compiler options and the unrolled
n_jitted_steps loop (glibc's allocator settings: backend/host.py). `backend/__init__.py`
switches them on.

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
can coexist in the backward pass; both work against rematerialization, so modules inside a
rematerialized block (config.training.remat) keep the plain formulations (`_interceptor`).

Everything is written as custom JVPs, not VJPs, so forward-mode autodiff (the likelihood's
divergence, any `jax.jvp` through a network) works as for the plain layers. The results equal
plain autodiff's up to float32 summation order (tests/test_perf.py); a network traced outside
`formulations()` uses the plain ones (models/ alone), e.g. to compare.

XLA's 3x3 weight gradient itself is kept: measured per layer shape (benchmarks/
conv_grad_probe.py), every matmul-based formulation (im2col, 9 shifted matmuls, 3 row-shifted
matmuls, flat contiguous taps) was 1.2-2.5x slower than XLA's YNNPACK kernels (jax 0.10).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

from models import layers
from models import precision as precision_lib


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
    return _cotangent_barrier(y)


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
    return _fast_channel_product(x, w, precision) + b


def conv_fn(precision: str):
    """A drop-in `lax.conv_general_dilated` (for `nn.Conv(conv_general_dilated=...)`) with
    the gradient formulations above; products in `precision`."""
    plain = precision_lib.conv_fn(precision)

    def conv(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
             dimension_numbers=None, feature_group_count=1, **kwargs):
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

    A forward computation, not a gradient formulation: used inside rematerialized blocks too.
    """
    threshold = round(rate * 65536)
    n = math.prod(x.shape)
    words = jax.random.bits(rng, ((n + 1) // 2,), jnp.uint32)
    halves = jnp.concatenate([words & 0xFFFF, words >> 16])[:n].reshape(x.shape)
    keep = halves >= jnp.uint32(threshold)
    return jnp.where(keep, x * (65536 / (65536 - threshold)), 0.0).astype(x.dtype)


def _in_lifted_transform(module: nn.Module) -> bool:
    """Whether `module` runs inside a lifted transform (nn.remat here): there flax calls a
    clone of the transformed module whose parent is a scope, so the chain of parent modules
    ends at a module with a nonempty scope path instead of at the network applied."""
    while isinstance(module.parent, nn.Module):
        module = module.parent
    return module.scope is not None and bool(module.scope.path)


def _interceptor(next_fun, args, kwargs, context):
    """The CPU formulations in place of the plain modules' methods (flax method interception):
    layers.ConvProduct -> conv_fn, layers.ChannelDense -> channel_dense, layers.ResidualSum ->
    its sum through cotangent_barrier (all three plain inside a rematerialized block), and
    layers.Dropout.drop -> dropout (everywhere)."""
    module, name = context.module, context.method_name
    if isinstance(module, layers.Dropout) and name == "drop":
        return dropout(args[0], module.rate, module.make_rng("dropout"))
    if name != "__call__" or not isinstance(
            module, (layers.ConvProduct, layers.ChannelDense, layers.ResidualSum)):
        return next_fun(*args, **kwargs)
    if _in_lifted_transform(module):
        return next_fun(*args, **kwargs)
    if isinstance(module, layers.ConvProduct):
        return conv_fn(module.precision)(*args, **kwargs)
    if isinstance(module, layers.ChannelDense):
        return channel_dense(*args, **kwargs, precision=module.precision)
    return cotangent_barrier(next_fun(*args, **kwargs))


def formulations():
    """A context in which networks traced use the formulations above."""
    return nn.intercept_methods(_interceptor)


# XLA:CPU's memory-optimized scheduler: 27% less temporary memory for the NCSN++ train step
# (1273 -> 928 MiB at batch 8) and 96% less for its initialization (325 -> 14 MiB) at the same
# speed; the default scheduler keeps more buffers live so that independent operations can run
# concurrently, which a few CPU cores cannot exploit.
COMPILER_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}

# XLA:CPU runs a train step 10-15x slower inside a while loop than straight-line (3.9 s vs
# 0.25 s for the quickstart model at batch 16, forward passes alone are unaffected), so the
# n_jitted_steps steps of one call are unrolled; a scan of length 1 is still a loop.
UNROLL_STEPS = True
