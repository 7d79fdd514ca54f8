"""Predictor-corrector and probability-flow ODE samplers (Song et al. 2021, Sec. 4, App. F-G).

Solvers see only a score function `score_fn(x, t) -> score shaped like x` (x [B, ...],
t [B]); everything that differs between SDEs is asked of the `sde_lib.SDE` object
(`discretize`, `reverse`, `langevin_alpha`, `ancestral_update`, ...), so a new SDE subclass
or a new predictor/corrector registered here works with every sampler unchanged.

Jit pattern. Samplers are pure functions of `(rng, score_fn)`. Called directly, they compile
one XLA program per (sampler, score_fn object) and reuse it. To sample from a trained network,
build the score function inside a jitted function so the parameters are traced, not baked
into the program as constants:

    sampler = get_pc_sampler(sde, shape, 'reverse_diffusion', 'langevin', inverse_scaler, 0.16)
    sample = jax.jit(lambda rng, params: sampler(rng, make_score_fn(params))[0])

The host-side `method='scipy_rk45'` ODE sampler (the paper's solver) cannot be traced.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence

import diffrax
import jax
import jax.numpy as jnp
import numpy as np
import scipy.integrate

import sde_lib
from sde_lib import batch_mul

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]

_PREDICTORS: dict[str, type] = {}
_CORRECTORS: dict[str, type] = {}


def _register(registry: dict[str, type], kind: str, cls=None, *, name: str | None = None):
    def _add(c):
        key = c.__name__ if name is None else name
        if key in registry and registry[key] is not c:
            raise ValueError(f"A {kind} named {key!r} is already registered.")
        registry[key] = c
        return c

    return _add if cls is None else _add(cls)


def register_predictor(cls=None, *, name: str | None = None):
    """Class decorator: `@register_predictor(name='my_predictor')` (default: the class name)."""
    return _register(_PREDICTORS, "predictor", cls, name=name)


def register_corrector(cls=None, *, name: str | None = None):
    """Class decorator: `@register_corrector(name='my_corrector')` (default: the class name)."""
    return _register(_CORRECTORS, "corrector", cls, name=name)


def get_predictor(name: str) -> type:
    if name not in _PREDICTORS:
        raise ValueError(f"Unknown predictor {name!r}; valid names: {sorted(_PREDICTORS)}.")
    return _PREDICTORS[name]


def get_corrector(name: str) -> type:
    if name not in _CORRECTORS:
        raise ValueError(f"Unknown corrector {name!r}; valid names: {sorted(_CORRECTORS)}.")
    return _CORRECTORS[name]


def _norm_per_example(x):
    return jnp.linalg.norm(x.reshape(x.shape[0], -1), axis=-1)


class Predictor(abc.ABC):
    """One step of a numerical solver of the reverse SDE (or probability-flow ODE).

    `score_evals` is the number of score evaluations one `update_fn` call makes; the PC
    sampler multiplies it into its reported NFE.
    """

    score_evals: int = 1

    def __init__(self, sde: sde_lib.SDE, score_fn: ScoreFn, probability_flow: bool = False):
        self.sde = sde
        self.score_fn = score_fn
        self.probability_flow = probability_flow
        self.rsde = sde.reverse(score_fn, probability_flow)

    @abc.abstractmethod
    def update_fn(self, rng, x, t):
        """x [B, ...], t [B] -> (x at the next (lower) time, its noise-free mean x_mean)."""


class Corrector(abc.ABC):
    """`n_steps` of score-based MCMC that leave p_t (approximately) invariant.

    `score_evals` is the number of score evaluations per MCMC step.
    """

    score_evals: int = 1

    def __init__(self, sde: sde_lib.SDE, score_fn: ScoreFn, snr: float, n_steps: int):
        self.sde = sde
        self.score_fn = score_fn
        self.snr = snr
        self.n_steps = n_steps

    @abc.abstractmethod
    def update_fn(self, rng, x, t):
        """x [B, ...], t [B] -> (x after n_steps MCMC steps at time t, the last step's mean)."""


@register_predictor(name="euler_maruyama")
class EulerMaruyamaPredictor(Predictor):
    """Euler-Maruyama on the reverse SDE (Eq. 6) with dt = -T / N, as in the reference."""

    def update_fn(self, rng, x, t):
        dt = -self.sde.T / self.sde.N
        drift, diffusion = self.rsde.sde(x, t)
        # x_{t+dt} = x + [f - g^2 score] dt + g sqrt(|dt|) z.
        x_mean = x + drift * dt
        z = jax.random.normal(rng, x.shape, x.dtype)
        return x_mean + batch_mul(diffusion * math.sqrt(-dt), z), x_mean


@register_predictor(name="reverse_diffusion")
class ReverseDiffusionPredictor(Predictor):
    """Reverse diffusion sampler (Eq. 46): runs the SDE's own discretization backwards."""

    def update_fn(self, rng, x, t):
        f, G = self.rsde.discretize(x, t)
        # x_i = x_{i+1} - f_{i+1} + G_{i+1}^2 score + G_{i+1} z, with the score inside f.
        x_mean = x - f
        z = jax.random.normal(rng, x.shape, x.dtype)
        return x_mean + batch_mul(G, z), x_mean


@register_predictor(name="ancestral_sampling")
class AncestralSamplingPredictor(Predictor):
    """Ancestral sampling of the SDE's discrete chain (Eq. 47 for SMLD, DDPM's sampler for VP)."""

    def __init__(self, sde, score_fn, probability_flow=False):
        if not sde.has_ancestral_update:
            raise ValueError(
                f"Predictor 'ancestral_sampling' needs an SDE with an ancestral update; "
                f"{type(sde).__name__} has none. Use 'reverse_diffusion' or 'euler_maruyama'.")
        if probability_flow:
            raise ValueError("Predictor 'ancestral_sampling' has no probability-flow form; "
                             "use 'reverse_diffusion' or 'euler_maruyama'.")
        super().__init__(sde, score_fn, probability_flow)

    def update_fn(self, rng, x, t):
        score = self.score_fn(x, t)
        x_mean, std = self.sde.ancestral_update(x, t, score)
        z = jax.random.normal(rng, x.shape, x.dtype)
        return x_mean + batch_mul(std, z), x_mean


@register_predictor(name="none")
class NonePredictor(Predictor):
    """Leaves x unchanged (corrector-only sampling)."""

    score_evals = 0

    def update_fn(self, rng, x, t):
        return x, x


@register_corrector(name="langevin")
class LangevinCorrector(Corrector):
    """Langevin MCMC with a signal-to-noise-ratio step size (Algorithms 4 and 5)."""

    def update_fn(self, rng, x, t):
        alpha = self.sde.langevin_alpha(t)

        def step(i, carry):
            x, _ = carry
            score = self.score_fn(x, t)
            z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
            # epsilon = 2 alpha (r ||z|| / ||score||)^2 with both norms averaged over the whole
            # batch; under jit on a sharded batch this mean is global, as in the paper.
            grad_norm = jnp.mean(_norm_per_example(score))
            noise_norm = jnp.mean(_norm_per_example(z))
            step_size = 2.0 * alpha * (self.snr * noise_norm / grad_norm) ** 2
            # x <- x + epsilon score + sqrt(2 epsilon) z.
            x_mean = x + batch_mul(step_size, score)
            return x_mean + batch_mul(jnp.sqrt(2.0 * step_size), z), x_mean

        return jax.lax.fori_loop(0, self.n_steps, step, (x, x))


@register_corrector(name="ald")
class AnnealedLangevinDynamics(Corrector):
    """Annealed Langevin dynamics of NCSN (Song & Ermon 2019): step 2 alpha (r std_t)^2."""

    def update_fn(self, rng, x, t):
        alpha = self.sde.langevin_alpha(t)
        std = self.sde.marginal_prob(x, t)[1]
        step_size = 2.0 * alpha * (self.snr * std) ** 2

        def step(i, carry):
            x, _ = carry
            score = self.score_fn(x, t)
            z = jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
            # x <- x + epsilon score + sqrt(2 epsilon) z.
            x_mean = x + batch_mul(step_size, score)
            return x_mean + batch_mul(jnp.sqrt(2.0 * step_size), z), x_mean

        return jax.lax.fori_loop(0, self.n_steps, step, (x, x))


@register_corrector(name="none")
class NoneCorrector(Corrector):
    """Leaves x unchanged (predictor-only sampling)."""

    score_evals = 0

    def update_fn(self, rng, x, t):
        return x, x


def _unusable_score_fn(x, t):
    raise RuntimeError("Placeholder score function used only to validate a sampler's setup.")


def _resolve(part, getter, base: type, kind: str) -> type:
    if isinstance(part, str):
        return getter(part)
    if isinstance(part, type) and issubclass(part, base):
        return part
    raise ValueError(f"{kind} must be a registered name or a {base.__name__} subclass, "
                     f"got {part!r}.")


def get_pc_sampler(sde: sde_lib.SDE, shape: Sequence[int], predictor, corrector,
                   inverse_scaler: Callable, snr: float, n_steps: int = 1,
                   probability_flow: bool = False, denoise: bool = True, eps: float = 1e-3):
    """Predictor-corrector sampler (Algorithm 1), compiled into one XLA program.

    Args:
      sde: the forward SDE.
      shape: sample shape [B, ...].
      predictor, corrector: registered names or `Predictor` / `Corrector` subclasses.
      inverse_scaler: maps model space back to data space (elementwise).
      snr: signal-to-noise ratio of the corrector.
      n_steps: corrector steps per noise level.
      probability_flow: predict with the probability-flow ODE instead of the reverse SDE.
      denoise: return the last step's noise-free mean instead of the noisy sample.
      eps: the last (smallest) time.

    Returns:
      `sampler(rng, score_fn) -> (samples shaped `shape`, nfe)` where nfe counts score
      evaluations actually made: N (n_steps c + p), with c = 0 for corrector 'none' and
      p = 0 for predictor 'none' (the reference reports N (n_steps + 1) regardless).
    """
    shape = tuple(int(s) for s in shape)
    predictor_cls = _resolve(predictor, get_predictor, Predictor, "predictor")
    corrector_cls = _resolve(corrector, get_corrector, Corrector, "corrector")
    if int(n_steps) < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}.")
    # Constructing the parts once here surfaces invalid combinations (e.g. ancestral sampling
    # of an SDE without an ancestral update) before anything is compiled.
    predictor_cls(sde, _unusable_score_fn, probability_flow)
    corrector_cls(sde, _unusable_score_fn, snr, n_steps)
    nfe = sde.N * (n_steps * corrector_cls.score_evals + predictor_cls.score_evals)

    def sample(rng, score_fn):
        predictor_obj = predictor_cls(sde, score_fn, probability_flow)
        corrector_obj = corrector_cls(sde, score_fn, snr, n_steps)
        rng, prior_rng = jax.random.split(rng)
        x = sde.prior_sampling(prior_rng, shape)
        timesteps = jnp.linspace(sde.T, eps, sde.N)

        def step(i, carry):
            x, _ = carry
            t = jnp.full((shape[0],), timesteps[i], x.dtype)
            corrector_rng, predictor_rng = jax.random.split(jax.random.fold_in(rng, i))
            # Corrector first: MCMC towards p_t at the current time.
            x, x_mean = corrector_obj.update_fn(corrector_rng, x, t)
            # Then the predictor: one reverse-time step towards the next time.
            x, x_mean = predictor_obj.update_fn(predictor_rng, x, t)
            return x, x_mean

        x, x_mean = jax.lax.fori_loop(0, sde.N, step, (x, x))
        return inverse_scaler(x_mean if denoise else x)

    # score_fn is a static argument: one compiled program per score function object. Under an
    # outer jit the call inlines and a score_fn closing over traced parameters just works.
    compiled = jax.jit(sample, static_argnums=1)

    def sampler(rng, score_fn: ScoreFn):
        return compiled(rng, score_fn), nfe

    return sampler


# ODE solvers. Diffrax solvers run on device from a fixed first step of 1% of the interval
# (the PID controller adapts it at once), so the NFE follows from the step count alone: one
# evaluation for the FSAL initial derivative, then num_stages (minus one when the last stage
# is reused) per attempted step, accepted or rejected. tests/test_sampling.py checks this
# against a count of actual calls.
_DIFFRAX_SOLVERS = {"dopri5": diffrax.Dopri5, "tsit5": diffrax.Tsit5, "bosh3": diffrax.Bosh3}
_SCIPY_METHODS = {"scipy_rk45": "RK45", "rk45": "RK45"}


def check_ode_method(method: str) -> str:
    key = method.lower()
    if key not in _DIFFRAX_SOLVERS and key not in _SCIPY_METHODS:
        raise ValueError(f"Unknown ODE method {method!r}; valid: "
                         f"{sorted(_DIFFRAX_SOLVERS) + sorted(_SCIPY_METHODS)}.")
    return key


def _diffrax_nfe(solver, stats):
    tableau = solver.tableau
    per_step = tableau.num_stages - 1 if tableau.fsal else tableau.num_stages
    return (1 if tableau.fsal else 0) + per_step * stats["num_steps"]


def _diffrax_solve(drift, y0, t0, t1, method, rtol, atol, max_steps):
    """Solves dy/dt = drift(t, y) from t0 to t1 on device; returns (y(t1), nfe)."""
    solver = _DIFFRAX_SOLVERS[method]()
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(lambda t, y, args: drift(t, y)), solver, t0=t0, t1=t1,
        dt0=0.01 * (t1 - t0), y0=y0,
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
    y1 = jax.tree_util.tree_map(lambda leaf: leaf[-1], sol.ys)
    return y1, _diffrax_nfe(solver, sol.stats)


def _reject_tracer(x, what: str):
    if isinstance(x, jax.core.Tracer):
        raise TypeError(f"{what} integrates on the host with scipy and cannot run under "
                        "jax.jit; use method='dopri5' there.")


def get_ode_sampler(sde: sde_lib.SDE, shape: Sequence[int], inverse_scaler: Callable,
                    denoise: bool = False, rtol: float = 1e-5, atol: float = 1e-5,
                    method: str = "dopri5", eps: float = 1e-3, max_steps: int = 16384):
    """Probability-flow ODE sampler (Eq. 13), integrated from T to eps.

    Args:
      method: a diffrax adaptive solver run on device ('dopri5' default, 'tsit5', 'bosh3')
        with a PID step-size controller, or 'scipy_rk45' (alias 'RK45'): the paper's host-side
        scipy RK45 calling a jitted drift.
      denoise: finish with one reverse-diffusion step at eps and return its mean (one more
        score evaluation).
      max_steps: diffrax step budget; exceeding it raises an error.

    Returns:
      `sampler(rng, score_fn, z=None) -> (samples shaped `shape`, nfe)`. Starts from the latent
      `z` [shape] when given, else from the prior. `nfe` is the true number of score
      evaluations (an int32 array for diffrax, an int for scipy).
    """
    shape = tuple(int(s) for s in shape)
    method = check_ode_method(method)

    def drift_fn(score_fn):
        rsde = sde.reverse(score_fn, probability_flow=True)

        def drift(t, x):
            return rsde.sde(x, jnp.full((x.shape[0],), t, x.dtype))[0]

        return drift

    def start(rng, z):
        return sde.prior_sampling(rng, shape) if z is None else jnp.asarray(z)

    def finish(x, score_fn):
        if not denoise:
            return inverse_scaler(x)
        # One reverse-diffusion step at eps removes the noise left at t = eps; keep its mean.
        t = jnp.full((shape[0],), eps, x.dtype)
        _, x_mean = ReverseDiffusionPredictor(sde, score_fn).update_fn(jax.random.key(0), x, t)
        return inverse_scaler(x_mean)

    if method in _DIFFRAX_SOLVERS:

        def sample(rng, score_fn, z):
            x, nfe = _diffrax_solve(drift_fn(score_fn), start(rng, z), sde.T, eps, method, rtol,
                                    atol, max_steps)
            return finish(x, score_fn), nfe + int(denoise)

        compiled = jax.jit(sample, static_argnums=1)

        def sampler(rng, score_fn: ScoreFn, z=None):
            return compiled(rng, score_fn, z)

        return sampler

    # Jitted drift and finishing step of the last score function, reused across calls.
    cache = {}

    def sampler(rng, score_fn: ScoreFn, z=None):
        _reject_tracer(rng if z is None else z, "get_ode_sampler(method='scipy_rk45')")
        x0 = start(rng, z)
        if cache.get("score_fn") is not score_fn:
            cache.update(score_fn=score_fn, drift=jax.jit(drift_fn(score_fn)),
                         finish=jax.jit(lambda x: finish(x, score_fn)))
        drift = cache["drift"]

        def ode_func(t, y):
            x = jnp.asarray(y.reshape(shape), x0.dtype)
            return np.asarray(drift(t, x), np.float64).reshape(-1)

        sol = scipy.integrate.solve_ivp(ode_func, (sde.T, eps), np.asarray(x0, np.float64).ravel(),
                                        rtol=rtol, atol=atol, method=_SCIPY_METHODS[method])
        x = jnp.asarray(sol.y[:, -1].reshape(shape), x0.dtype)
        return cache["finish"](x), int(sol.nfev) + int(denoise)

    return sampler


_SAMPLING_METHODS = ("pc", "ode")


def get_sampling_fn(config, sde: sde_lib.SDE, shape: Sequence[int], inverse_scaler: Callable,
                    eps: float):
    """Builds the sampler named by `config.sampling.method` ('pc' or 'ode').

    Reads config.sampling.{predictor, corrector, snr, n_steps_each, noise_removal,
    probability_flow} and, when present, {ode_method, ode_rtol, ode_atol} (defaults 'dopri5',
    1e-5, 1e-5).
    """
    cfg = config.sampling
    method = cfg.method.lower()
    if method == "pc":
        return get_pc_sampler(sde, shape, cfg.predictor, cfg.corrector, inverse_scaler,
                              snr=cfg.snr, n_steps=cfg.n_steps_each,
                              probability_flow=cfg.probability_flow,
                              denoise=cfg.noise_removal, eps=eps)
    if method == "ode":
        return get_ode_sampler(sde, shape, inverse_scaler, denoise=cfg.noise_removal,
                               rtol=cfg.get("ode_rtol", 1e-5), atol=cfg.get("ode_atol", 1e-5),
                               method=cfg.get("ode_method", "dopri5"), eps=eps)
    raise ValueError(f"Unknown sampling method {cfg.method!r}; valid: {list(_SAMPLING_METHODS)}.")
