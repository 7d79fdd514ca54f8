"""Compute precision of the score networks: `config.training.precision`.

'float32' computes everything in float32. 'bfloat16' feeds convolutions and matrix products
bfloat16 operands and accumulates them in float32 (`preferred_element_type`), so their
results, every elementwise operation, the normalizations, the parameters, the optimizer
state, the EMA and the loss stay float32; only the operands of the FLOP-heavy products are
rounded. On GPUs and TPUs those products then run on the bfloat16 matrix units.

Modules take a `precision: str` field and build their products with `conv_fn`, `dot_fn` and
`einsum` from here.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax

PRECISIONS = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def check_precision(precision: str) -> None:
    """Raises ValueError naming the bad value and the valid choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}; valid: {sorted(PRECISIONS)} "
                         "(config.training.precision).")


def compute_dtype(precision: str):
    check_precision(precision)
    return PRECISIONS[precision]


def _cast(dtype, *arrays):
    return tuple(a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a
                 for a in arrays)


def _conv(lhs, rhs, *args, compute_dtype=None, out_dtype=None, **kwargs):
    kwargs.pop("preferred_element_type", None)
    lhs, rhs = _cast(compute_dtype, lhs, rhs)
    return lax.conv_general_dilated(lhs, rhs, *args, preferred_element_type=out_dtype,
                                    **kwargs)


def _dot(lhs, rhs, *args, compute_dtype=None, out_dtype=None, **kwargs):
    kwargs.pop("preferred_element_type", None)
    lhs, rhs = _cast(compute_dtype, lhs, rhs)
    return lax.dot_general(lhs, rhs, *args, preferred_element_type=out_dtype, **kwargs)


def conv_fn(precision: str):
    """A drop-in `lax.conv_general_dilated` (for `nn.Conv(conv_general_dilated=...)`)."""
    dtype = compute_dtype(precision)
    if dtype == jnp.float32:
        return lax.conv_general_dilated
    return functools.partial(_conv, compute_dtype=dtype, out_dtype=jnp.float32)


def dot_fn(precision: str):
    """A drop-in `lax.dot_general` (for `nn.Dense(dot_general=...)`)."""
    dtype = compute_dtype(precision)
    if dtype == jnp.float32:
        return lax.dot_general
    return functools.partial(_dot, compute_dtype=dtype, out_dtype=jnp.float32)


def einsum(spec: str, a, b, precision: str = "float32"):
    """jnp.einsum of two operands in the given precision, with a float32 result."""
    dtype = compute_dtype(precision)
    if dtype == jnp.float32:
        return jnp.einsum(spec, a, b)
    a, b = _cast(dtype, a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)
