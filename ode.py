"""The one probability-flow ODE solve (Song et al. 2021, Sec. 4.3, Eq. 13; App. D.2).

The ODE sampler, the likelihood and run_lib all integrate dy/dt = drift(t, y) through `solve`;
this module owns the method table, the NFE count and the host/device split.

Methods (names are case-insensitive):
- on device, jit-compatible (diffrax adaptive Runge-Kutta with a PID step-size controller):
  'dopri5' (default), 'tsit5', 'bosh3';
- on the host (`scipy.integrate.solve_ivp`, as the paper and yang-song/score_sde do), calling a
  jitted right-hand side: 'RK45' (the reference's default name), 'RK23', 'DOP853', 'Radau',
  'BDF', 'LSODA', and 'scipy_rk45' (an alias of 'RK45'). These cannot run under `jax.jit`;
  ask `is_host_method(name)` before jitting a function that solves.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate
from jax.flatten_util import ravel_pytree

DEVICE_METHODS = {"dopri5": diffrax.Dopri5, "tsit5": diffrax.Tsit5, "bosh3": diffrax.Bosh3}
HOST_METHODS = ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA")
_ALIASES = {"scipy_rk45": "RK45"}
_CANONICAL = {**{m.lower(): m for m in (*DEVICE_METHODS, *HOST_METHODS)}, **_ALIASES}
METHODS = tuple(DEVICE_METHODS) + HOST_METHODS + tuple(_ALIASES)

Drift = Callable[[jax.Array, object, object], object]


def canonical_method(method: str) -> str:
    """The method's canonical spelling ('RK45', 'dopri5', ...); ValueError listing valid names."""
    key = str(method).lower()
    if key not in _CANONICAL:
        raise ValueError(f"Unknown ODE method {method!r}; valid (case-insensitive): "
                         f"{list(METHODS)}.")
    return _CANONICAL[key]


def is_host_method(method: str) -> bool:
    """True for the scipy methods, which integrate on the host and cannot be jitted."""
    return canonical_method(method) in HOST_METHODS


def solve(drift: Drift, y0, t0: float, t1: float, method: str = "dopri5", rtol: float = 1e-5,
          atol: float = 1e-5, max_steps: int = 16384, args=None):
    """Integrates dy/dt = drift(t, y, args) from t0 to t1; returns (y(t1), nfe).

    `y0` is any pytree of float arrays and `drift(t, y, args)` returns one of the same
    structure; t is a scalar; `args` is a pytree of arrays passed through unchanged (traced, so
    a host solve compiles its right-hand side once for all values of args). `nfe` counts
    drift evaluations: an int32 array on device, an int on the host.
    Device methods stop with an error after `max_steps` steps; host methods ignore it.
    """
    method = canonical_method(method)
    if method in HOST_METHODS:
        return _solve_on_host(drift, y0, t0, t1, method, rtol, atol, args)
    solver = DEVICE_METHODS[method]()
    # A fixed first step of 1% of the interval (the PID controller adapts it at once) keeps the
    # evaluation count a function of the step count alone: one evaluation for the first-same-
    # as-last initial derivative, then num_stages (minus the reused one) per attempted step.
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(drift), solver, t0=t0, t1=t1, dt0=0.01 * (t1 - t0), y0=y0, args=args,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
    tableau = solver.tableau
    per_step = tableau.num_stages - 1 if tableau.fsal else tableau.num_stages
    nfe = (1 if tableau.fsal else 0) + per_step * sol.stats["num_steps"]
    return jax.tree_util.tree_map(lambda leaf: leaf[-1], sol.ys), nfe


@functools.lru_cache(maxsize=16)
def _jitted(fn):
    # A host solve calls the same drift object on every call of a sampler with the same score
    # function (callers build one drift per score function), so it compiles once, not per solve.
    return jax.jit(fn)


def _solve_on_host(drift, y0, t0, t1, method, rtol, atol, args):
    if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves((y0, args))):
        raise TypeError(f"ODE method {method!r} integrates on the host with scipy and cannot "
                        "run under jax.jit; use an on-device method "
                        f"{list(DEVICE_METHODS)} there.")
    flat0, unravel = ravel_pytree(y0)
    dtype = flat0.dtype
    jitted = _jitted(drift)

    def rhs(t, y):
        dy = jitted(jnp.asarray(t, dtype), unravel(jnp.asarray(y, dtype)), args)
        return np.asarray(ravel_pytree(dy)[0], np.float64)

    sol = scipy.integrate.solve_ivp(rhs, (t0, t1), np.asarray(flat0, np.float64), rtol=rtol,
                                    atol=atol, method=method)
    if not sol.success:
        raise RuntimeError(f"scipy {method} failed to integrate the ODE: {sol.message}")
    return unravel(jnp.asarray(sol.y[:, -1], dtype)), int(sol.nfev)
