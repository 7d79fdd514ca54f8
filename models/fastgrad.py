"""Gradient formulations that XLA:CPU runs faster than the ones autodiff derives.

`channel_dense(x, w, b)`: a per-pixel dense layer over the channel axis (NIN, the attention
projections), x [..., C] @ w [C, D] + b [D], with a custom VJP. Its weight gradient contracts
the flattened pixels of x [P, C] and of the cotangent g [P, D] over P. Autodiff leaves XLA
free to fuse the transposition this contraction needs into the producer of g, which in NCSN++
is a large fusion of GroupNorm and skip-connection gradients: XLA:CPU then evaluates that
fusion in transposed, cache-hostile order (0.1-0.2 s per attention block at 16x16, batch 8).
An optimization barrier makes g a materialized buffer first; the products are unchanged, so
the result equals autodiff's up to float32 summation order. Measured on the CIFAR-10 NCSN++
train gradient at batch 8 on 2 CPU cores: 7.8 s instead of 8.4 s.

Convolutions keep XLA's own weight gradient: measured per layer shape (benchmarks/
conv_grad_probe.py), it is as fast as the forward convolution on XLA:CPU with its YNNPACK
kernels (jax 0.10), and every matmul-based formulation (im2col, 9 shifted matmuls, 3
row-shifted matmuls, flat contiguous taps) was 1.2-2.5x slower.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from models import precision as precision_lib


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def channel_dense(x, w, b, precision: str = "float32"):
    """x [..., C] @ w [C, D] + b [D] -> [..., D] (float32), products in `precision`."""
    return precision_lib.einsum("...c,cd->...d", x, w, precision) + b


def _channel_dense_fwd(x, w, b, precision):
    return channel_dense(x, w, b, precision), (x, w)


def _channel_dense_bwd(precision, residuals, g):
    x, w = residuals
    c, d = w.shape
    # Materialize the cotangent before the contractions read it (see the module docstring).
    g2 = lax.optimization_barrier(g.reshape(-1, d))
    dot = precision_lib.dot_fn(precision)
    dw = dot(x.reshape(-1, c), g2, (((0,), (0,)), ((), ())))
    dx = dot(g2, w, (((1,), (1,)), ((), ()))).reshape(x.shape)
    return dx.astype(x.dtype), dw.astype(w.dtype), jnp.sum(g2, axis=0).astype(w.dtype)


channel_dense.defvjp(_channel_dense_fwd, _channel_dense_bwd)
