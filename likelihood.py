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

import math
from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate

import sde_lib

_HUTCHINSON_TYPES = ("Rademacher", "Gaussian")
# On-device adaptive solvers (diffrax) and the paper's host-side scipy solver. Diffrax starts
# from a fixed first step of 1% of the interval, so its NFE is 1 (FSAL initial derivative) +
# num_stages (minus 1 when the last stage is reused) per attempted step.
_DIFFRAX_SOLVERS = {"dopri5": diffrax.Dopri5, "tsit5": diffrax.Tsit5, "bosh3": diffrax.Bosh3}
_SCIPY_METHODS = {"scipy_rk45": "RK45", "rk45": "RK45"}


def _sum_except_batch(x):
    return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def _probe(rng, shape, hutchinson_type: str):
    if hutchinson_type == "Gaussian":
        return jax.random.normal(rng, shape)
    return jax.random.rademacher(rng, shape, jnp.float32)


def _log2_scaler_slope(inverse_scaler: Callable, example_shape) -> jax.Array:
    """Mean over dimensions of log2 |d inverse_scaler / dx| for an elementwise-linear scaler."""
    zeros = jnp.zeros((1,) + tuple(example_shape), jnp.float32)
    _, slope = jax.jvp(inverse_scaler, (zeros,), (jnp.ones_like(zeros),))
    return jnp.mean(jnp.log2(jnp.abs(slope)))


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
      method: 'dopri5' (default), 'tsit5' or 'bosh3' (diffrax, on device) or 'scipy_rk45'
        (alias 'RK45': the paper's host-side scipy RK45 with a jitted right-hand side; cannot
        run under jax.jit).
      eps: the time the ODE starts from (avoids the singular score at t = 0).
      max_steps: diffrax step budget; exceeding it raises an error.

    `data` [B, ...] is in model space (already scaled). Returns bits/dim per example, the latent
    z = x(T) and the number of score evaluations (each one a forward-mode JVP of score_fn).
    """
    valid = {h.lower(): h for h in _HUTCHINSON_TYPES}
    if hutchinson_type.lower() not in valid:
        raise ValueError(f"Unknown hutchinson_type {hutchinson_type!r}; "
                         f"valid: {list(_HUTCHINSON_TYPES)}.")
    hutchinson_type = valid[hutchinson_type.lower()]
    method_key = method.lower()
    if method_key not in _DIFFRAX_SOLVERS and method_key not in _SCIPY_METHODS:
        raise ValueError(f"Unknown ODE method {method!r}; valid: "
                         f"{sorted(_DIFFRAX_SOLVERS) + sorted(_SCIPY_METHODS)}.")

    def augmented_drift(score_fn, probe):
        """d/dt [x, log-density change] = [f~(x, t), v^T (df~/dx) v]."""
        rsde = sde.reverse(score_fn, probability_flow=True)

        def drift(t, state):
            x, _ = state
            vec_t = jnp.full((x.shape[0],), t, x.dtype)
            # One JVP yields the drift and the Jacobian-probe product together.
            f, jac_v = jax.jvp(lambda y: rsde.sde(y, vec_t)[0], (x,), (probe,))
            return f, _sum_except_batch(jac_v * probe)

        return drift

    def to_bpd(z, delta_logp, data):
        dim = math.prod(data.shape[1:])
        # log p_eps(x) = log p_T(z) + int_eps^T div f~ dt.
        logp = sde.prior_logp(z) + delta_logp
        return (-logp / (dim * np.log(2.0)) + 8.0
                + _log2_scaler_slope(inverse_scaler, data.shape[1:]))

    if method_key in _DIFFRAX_SOLVERS:

        def likelihood(rng, score_fn, data):
            probe = _probe(rng, data.shape, hutchinson_type)
            solver = _DIFFRAX_SOLVERS[method_key]()
            y0 = (data, jnp.zeros((data.shape[0],), data.dtype))
            sol = diffrax.diffeqsolve(
                diffrax.ODETerm(lambda t, y, args: augmented_drift(score_fn, probe)(t, y)),
                solver, t0=eps, t1=sde.T, dt0=0.01 * (sde.T - eps), y0=y0,
                stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
                saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
            z, delta_logp = sol.ys[0][-1], sol.ys[1][-1]
            tableau = solver.tableau
            per_step = tableau.num_stages - 1 if tableau.fsal else tableau.num_stages
            nfe = (1 if tableau.fsal else 0) + per_step * sol.stats["num_steps"]
            return to_bpd(z, delta_logp, data), z, nfe

        compiled = jax.jit(likelihood, static_argnums=1)

        def likelihood_fn(rng, score_fn, data):
            return compiled(rng, score_fn, jnp.asarray(data))

        return likelihood_fn

    # Jitted right-hand side of the last score function, reused across calls.
    cache = {}

    def likelihood_fn(rng, score_fn, data):
        data = jnp.asarray(data)
        if isinstance(data, jax.core.Tracer) or isinstance(rng, jax.core.Tracer):
            raise TypeError("likelihood method 'scipy_rk45' integrates on the host and cannot "
                            "run under jax.jit; use method='dopri5' there.")
        probe = _probe(rng, data.shape, hutchinson_type)
        if cache.get("score_fn") is not score_fn:
            cache.update(score_fn=score_fn, drift=jax.jit(
                lambda t, x, v: augmented_drift(score_fn, v)(t, (x, None))))
        drift = cache["drift"]
        size = data.size

        def ode_func(t, y):
            x = jnp.asarray(y[:size].reshape(data.shape), data.dtype)
            f, div = drift(t, x, probe)
            return np.concatenate([np.asarray(f, np.float64).ravel(),
                                   np.asarray(div, np.float64)])

        y0 = np.concatenate([np.asarray(data, np.float64).ravel(), np.zeros(data.shape[0])])
        sol = scipy.integrate.solve_ivp(ode_func, (eps, sde.T), y0, rtol=rtol, atol=atol,
                                        method=_SCIPY_METHODS[method_key])
        z = jnp.asarray(sol.y[:size, -1].reshape(data.shape), data.dtype)
        delta_logp = jnp.asarray(sol.y[size:, -1], data.dtype)
        return to_bpd(z, delta_logp, data), z, int(sol.nfev)

    return likelihood_fn
