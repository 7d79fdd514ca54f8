"""Exact log-likelihoods through the probability-flow ODE (Song et al. 2021, Sec. 4.3, App. D.2).

The instantaneous change of variables gives, along the probability-flow ODE
dx/dt = f~(x, t) = f(x, t) - g(t)^2 score(x, t) / 2 (Eq. 13),

    log p_eps(x(eps)) = log p_T(x(T)) + int_eps^T div f~(x(t), t) dt        (Eq. 39),

with the divergence estimated by Skilling-Hutchinson, div f~ ~= v^T (df~/dx) v, one probe v per
solve. Bits/dim follow the paper's convention for 8-bit data:
bpd = -log p(data) / (D ln 2) + 8 + log2(d inverse_scaler / dx) (7 for data centered to [-1, 1]).

Like the samplers, `likelihood_fn(rng, score_fn, data)` is a pure function: called directly it
compiles once per score function object; inside `jax.jit` build score_fn from traced params.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import ode
import sde_lib

_HUTCHINSON_TYPES = ("Rademacher", "Gaussian")


def _probe(rng, shape, hutchinson_type: str):
    if hutchinson_type == "Gaussian":
        return jax.random.normal(rng, shape)
    return jax.random.rademacher(rng, shape, jnp.float32)


def _log2_scaler_slope(inverse_scaler: Callable, example_shape) -> jax.Array:
    """Mean over dimensions of log2 |d inverse_scaler / dx| for an elementwise-linear scaler."""
    zeros = jnp.zeros((1,) + tuple(example_shape), jnp.float32)
    _, slope = jax.jvp(inverse_scaler, (zeros,), (jnp.ones_like(zeros),))
    return jnp.mean(jnp.log2(jnp.abs(slope)))


def _check_hutchinson_type(name: str) -> str:
    valid = {h.lower(): h for h in _HUTCHINSON_TYPES}
    if name.lower() not in valid:
        raise ValueError(f"Unknown hutchinson_type {name!r}; valid: {list(_HUTCHINSON_TYPES)}.")
    return valid[name.lower()]


@functools.lru_cache(maxsize=8)
def _augmented_drift(sde, score_fn):
    """d/dt [x, log-density change] = [f~(x, t), v^T (df~/dx) v] for the probe v (args).

    One drift object per (sde, score_fn), so a host solve compiles its right-hand side once.
    """
    rsde = sde.reverse(score_fn, probability_flow=True)

    def drift(t, state, probe):
        x, _ = state
        vec_t = jnp.full((x.shape[0],), t, x.dtype)
        # One JVP yields the drift and the Jacobian-probe product together.
        f, jac_v = jax.jvp(lambda y: rsde.sde(y, vec_t)[0], (x,), (probe,))
        return f, sde_lib.sum_except_batch(jac_v * probe)

    return drift


def get_likelihood_fn(sde: sde_lib.SDE, inverse_scaler: Callable,
                      hutchinson_type: str = "Rademacher", rtol: float = 1e-5,
                      atol: float = 1e-5, method: str = "dopri5", eps: float = 1e-5,
                      max_steps: int = 16384):
    """Builds `likelihood_fn(rng, score_fn, data) -> (bpd [B], z [B, ...], nfe)`.

    Args:
      sde: the forward SDE.
      inverse_scaler: elementwise-linear map from model space to data space in [0, 1].
      hutchinson_type: 'Rademacher' (default) or 'Gaussian' probes.
      rtol, atol: solver tolerances.
      method: an `ode` method: 'dopri5' (default), 'tsit5', 'bosh3' on device, or a scipy
        method on the host ('RK45', the paper's, 'RK23', 'DOP853', 'Radau', 'BDF', 'LSODA';
        these cannot run under jax.jit).
      eps: the time the ODE starts from (avoids the singular score at t = 0).
      max_steps: step budget of the device solvers; exceeding it raises an error.

    `data` [B, ...] is in model space (already scaled). Returns bits/dim per example, the latent
    z = x(T) and the number of score evaluations (each one a forward-mode JVP of score_fn).
    """
    hutchinson_type = _check_hutchinson_type(hutchinson_type)
    method = ode.canonical_method(method)

    def likelihood(rng, score_fn, data):
        probe = _probe(rng, data.shape, hutchinson_type)
        y0 = (data, jnp.zeros((data.shape[0],), data.dtype))
        (z, delta_logp), nfe = ode.solve(_augmented_drift(sde, score_fn), y0, eps, sde.T,
                                         method, rtol, atol, max_steps, args=probe)
        dim = math.prod(data.shape[1:])
        # log p_eps(x) = log p_T(z) + int_eps^T div f~ dt (Eq. 39).
        logp = sde.prior_logp(z) + delta_logp
        bpd = (-logp / (dim * np.log(2.0)) + 8.0
               + _log2_scaler_slope(inverse_scaler, data.shape[1:]))
        return bpd, z, nfe

    # Host methods call scipy and cannot be traced; device methods compile one program per
    # score function object.
    run = likelihood if ode.is_host_method(method) else jax.jit(likelihood, static_argnums=1)

    def likelihood_fn(rng, score_fn, data):
        return run(rng, score_fn, jnp.asarray(data))

    return likelihood_fn
