"""Performance features: compute precision, the persistent compilation cache, rematerialization
and the fast gradient formulations, each checked against the plain float32 computation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from models import precision

DN = ("NHWC", "HWIO", "NHWC")


def _bf16_round(x):
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))


def test_bfloat16_products_round_operands_and_accumulate_in_float32():
    rng = np.random.RandomState(0)
    x = rng.randn(2, 6, 6, 5).astype(np.float32)
    w = rng.randn(3, 3, 5, 4).astype(np.float32)
    a, b = rng.randn(7, 5).astype(np.float32), rng.randn(5, 3).astype(np.float32)
    conv = precision.conv_fn("bfloat16")(x, w, (1, 1), "SAME", dimension_numbers=DN)
    dot = precision.dot_fn("bfloat16")(a, b, (((1,), (0,)), ((), ())))
    ein = precision.einsum("ij,jk->ik", a, b, "bfloat16")
    assert conv.dtype == dot.dtype == ein.dtype == jnp.float32
    # Exactly the float32 products of the bf16-rounded operands (bf16 x bf16 is exact in f32).
    want_conv = lax.conv_general_dilated(_bf16_round(x), _bf16_round(w), (1, 1), "SAME",
                                         dimension_numbers=DN,
                                         precision=lax.Precision.HIGHEST)
    want_dot = _bf16_round(a).astype(np.float64) @ _bf16_round(b).astype(np.float64)
    np.testing.assert_allclose(conv, want_conv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dot, want_dot, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ein, want_dot, rtol=1e-5, atol=1e-5)
    # ... and not the float32 products of the unrounded ones.
    assert np.max(np.abs(np.asarray(dot) - a.astype(np.float64) @ b)) > 1e-3


def test_float32_precision_is_the_plain_computation():
    assert precision.conv_fn("float32") is lax.conv_general_dilated
    assert precision.dot_fn("float32") is lax.dot_general


@pytest.mark.parametrize("bad", ["float16", "bf16", "fp32", ""])
def test_unknown_precision_names_the_choices(bad):
    with pytest.raises(ValueError, match=r"bfloat16.*float32"):
        precision.check_precision(bad)


def test_bfloat16_gradients_flow_in_float32():
    w = jnp.ones((3, 3, 2, 2))
    x = jnp.linspace(-1, 1, 2 * 4 * 4 * 2).reshape(2, 4, 4, 2)
    conv = precision.conv_fn("bfloat16")
    g = jax.grad(lambda w: jnp.sum(conv(x, w, (1, 1), "SAME", dimension_numbers=DN) ** 2))(w)
    assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
