"""The one ODE module: every accepted method spelling, on device under jit and on the host.

dy/dt = -y from t0 = 0 to t1 = 1 has the exact solution y(1) = y(0) / e.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import likelihood
import ode
import sampling
import sde_lib

DEVICE_SPELLINGS = ["dopri5", "Dopri5", "tsit5", "TSIT5", "bosh3"]
HOST_SPELLINGS = ["RK45", "rk45", "scipy_rk45", "RK23", "DOP853", "Radau", "BDF", "LSODA",
                  "lsoda"]


def decay(t, y, args):
    return jax.tree_util.tree_map(lambda leaf: -leaf, y)


@pytest.mark.parametrize("method", DEVICE_SPELLINGS)
def test_device_methods_solve_under_jit(method):
    assert not ode.is_host_method(method)
    y0 = {"a": jnp.ones((3,)), "b": jnp.full((2, 2), 2.0)}
    solve = jax.jit(lambda y: ode.solve(decay, y, 0.0, 1.0, method, 1e-7, 1e-7))
    y1, nfe = solve(y0)
    np.testing.assert_allclose(y1["a"], np.exp(-1.0), rtol=1e-5)
    np.testing.assert_allclose(y1["b"], 2 * np.exp(-1.0), rtol=1e-5)
    assert int(nfe) > 3


@pytest.mark.parametrize("method", HOST_SPELLINGS)
def test_host_methods_solve_on_host_and_refuse_jit(method):
    assert ode.is_host_method(method)
    y0 = (jnp.ones((3,)), jnp.full((2,), 2.0))
    (a, b), nfe = ode.solve(decay, y0, 0.0, 1.0, method, 1e-8, 1e-8)
    np.testing.assert_allclose(a, np.exp(-1.0), rtol=1e-4)
    np.testing.assert_allclose(b, 2 * np.exp(-1.0), rtol=1e-4)
    assert isinstance(nfe, int) and nfe > 3
    with pytest.raises(TypeError, match="cannot run under jax.jit"):
        jax.jit(lambda y: ode.solve(decay, y, 0.0, 1.0, method)[0])(y0)


def test_args_reach_the_drift_and_unknown_methods_list_the_valid_ones():
    y1, _ = ode.solve(lambda t, y, k: -k * y, jnp.ones(2), 0.0, 1.0, "RK45", 1e-8, 1e-8,
                      args=jnp.asarray(2.0))
    np.testing.assert_allclose(y1, np.exp(-2.0), rtol=1e-4)
    with pytest.raises(ValueError, match="'dopri5'.*'RK45'.*'LSODA'"):
        ode.canonical_method("euler")


@pytest.mark.parametrize("method", ["RK45", "rk45", "scipy_rk45", "dopri5"])
def test_sampler_and_likelihood_accept_the_reference_spelling(method):
    # N(0, 1) data under VP: the exact score is -x, p_t = N(0, 1) for all t.
    sde = sde_lib.VPSDE(N=100)
    score_fn = lambda x, t: -x
    sampler = sampling.get_ode_sampler(sde, (4, 3), lambda x: x, method=method)
    z = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
    x, _ = sampler(jax.random.key(0), score_fn, z=z)
    # With the exact score of N(0, I) the probability-flow drift vanishes: x stays at z.
    np.testing.assert_allclose(x, z, atol=1e-4)
    likelihood_fn = likelihood.get_likelihood_fn(sde, lambda x: x, method=method)
    bpd, _, _ = likelihood_fn(jax.random.key(1), score_fn, z)
    expected = (-(-0.5 * np.sum(np.asarray(z) ** 2, axis=1) - 1.5 * np.log(2 * np.pi))
                / (3 * np.log(2)) + 8)
    np.testing.assert_allclose(bpd, expected, rtol=1e-4)
