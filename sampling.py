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

The ODE sampler with a host method (scipy's 'RK45', the paper's solver, and the other
`scipy.integrate.solve_ivp` methods; see `ode`) cannot be traced.
"""

from __future__ import annotations

import abc
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

import ode
import sde_lib
from sde_lib import ScoreFn, batch_mul

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


def registered_predictors() -> list[str]:
    return sorted(_PREDICTORS)


def registered_correctors() -> list[str]:
    return sorted(_CORRECTORS)


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
    if part is None:  # the reference's spelling of "no predictor" / "no corrector"
        return getter("none")
    if isinstance(part, str):
        return getter(part)
    if isinstance(part, type) and issubclass(part, base):
        return part
    raise ValueError(f"{kind} must be a registered name, a {base.__name__} subclass or None, "
                     f"got {part!r}.")


def get_pc_parts(sde: sde_lib.SDE, predictor, corrector, snr: float, n_steps: int = 1,
                 probability_flow: bool = False) -> tuple[type, type]:
    """Resolves and validates a predictor-corrector pair: (predictor class, corrector class).

    `predictor` and `corrector` are registered names, `Predictor` / `Corrector` subclasses, or
    None (meaning 'none'). Invalid combinations (e.g. ancestral sampling of an SDE without an
    ancestral update) fail here, before anything is compiled.
    """
    predictor_cls = _resolve(predictor, get_predictor, Predictor, "predictor")
    corrector_cls = _resolve(corrector, get_corrector, Corrector, "corrector")
    if int(n_steps) < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}.")
    predictor_cls(sde, _unusable_score_fn, probability_flow)
    corrector_cls(sde, _unusable_score_fn, snr, n_steps)
    return predictor_cls, corrector_cls


def pc_nfe(sde: sde_lib.SDE, predictor_cls: type, corrector_cls: type, n_steps: int) -> int:
    """Score evaluations of a PC run: N (n_steps c + p), c and p each 0 for 'none', else 1."""
    return sde.N * (n_steps * corrector_cls.score_evals + predictor_cls.score_evals)


def pc_loop(rng, x, sde: sde_lib.SDE, score_fn: ScoreFn, predictor_cls: type,
            corrector_cls: type, snr: float, n_steps: int = 1, probability_flow: bool = False,
            eps: float = 1e-3, project: Callable | None = None, steps=None, x_mean=None):
    """Algorithm 1 from x(T) = x down to t = eps: the loop every PC sampler shares.

    Args:
      x: the starting sample [B, ...] at time T.
      project: optional `project(rng, x, x_mean, t) -> (x, x_mean)` applied after every
        corrector and every predictor update; inverse problems use it to re-impose what is
        known (App. I.2).
      steps: optional (start, stop): run only the loop's steps start..stop-1 of 0..N-1,
        continuing from (x, x_mean) (ints, or traced int scalars so that one compiled program
        runs every part). Step i draws its noise from fold_in(rng, i), so running the loop in
        parts gives the same result as running it whole.

    Returns (x, x_mean) at eps: the last sample and its noise-free mean. Traceable; runs as one
    `lax.fori_loop`.
    """
    predictor = predictor_cls(sde, score_fn, probability_flow)
    corrector = corrector_cls(sde, score_fn, snr, n_steps)
    timesteps = jnp.linspace(sde.T, eps, sde.N)

    def step(i, carry):
        x, _ = carry
        t = jnp.full((x.shape[0],), timesteps[i], x.dtype)
        corrector_rng, predictor_rng = jax.random.split(jax.random.fold_in(rng, i))
        # Corrector first: MCMC towards p_t at the current time.
        x, x_mean = corrector.update_fn(corrector_rng, x, t)
        if project is not None:
            x, x_mean = project(jax.random.fold_in(corrector_rng, 1), x, x_mean, t)
        # Then the predictor: one reverse-time step towards the next time.
        x, x_mean = predictor.update_fn(predictor_rng, x, t)
        if project is not None:
            x, x_mean = project(jax.random.fold_in(predictor_rng, 1), x, x_mean, t)
        return x, x_mean

    start, stop = (0, sde.N) if steps is None else steps
    return jax.lax.fori_loop(start, stop, step, (x, x if x_mean is None else x_mean))


class LoopParts(NamedTuple):
    """A sampler whose main loop can run as several calls, so that a long batch can report
    progress and stop between them.

    init(rng, *inputs) -> carry (a pytree: the sample, its mean, the inputs it keeps);
    advance(carry, score_fn, start, stop) -> carry runs the loop's steps start..stop-1 (ints or
    traced int32 scalars: one compiled program serves every part); finish(carry) -> samples.
    finish(advance(init(rng, ...), score_fn, 0, num_steps)) is the sampler's result, and any
    split of 0..num_steps gives the same. nfe: score evaluations of the whole loop.
    """

    init: Callable
    advance: Callable
    finish: Callable
    num_steps: int
    nfe: int


def run_loop_parts(parts: LoopParts, rng, score_fn: ScoreFn, *inputs):
    """The whole sampler of `parts` in one call (traceable)."""
    carry = parts.init(rng, *inputs)
    return parts.finish(parts.advance(carry, score_fn, 0, parts.num_steps))


def get_pc_loop_parts(sde: sde_lib.SDE, shape: Sequence[int], predictor, corrector,
                      inverse_scaler: Callable, snr: float, n_steps: int = 1,
                      probability_flow: bool = False, denoise: bool = True,
                      eps: float = 1e-3, project: Callable | None = None,
                      start: Callable | None = None) -> LoopParts:
    """`get_pc_sampler`'s sampler as `LoopParts` (init(rng) starts from the prior).

    project: see `pc_loop`; called as project(rng, x, x_mean, t, *kept) with the arrays `kept`
    that init was given after rng (init(rng, *kept); the inverse problems keep their data and
    mask there). start: optional start(prior sample, *kept) -> the sample at T.
    """
    shape = tuple(int(s) for s in shape)
    predictor_cls, corrector_cls = get_pc_parts(sde, predictor, corrector, snr, n_steps,
                                                probability_flow)

    def init(rng, *kept):
        rng, prior_rng = jax.random.split(rng)
        x = sde.prior_sampling(prior_rng, shape)
        if start is not None:
            x = start(x, *kept)
        return rng, x, x, kept

    def advance(carry, score_fn, start, stop):
        rng, x, x_mean, kept = carry
        bound = None if project is None else (
            lambda r, x, x_mean, t: project(r, x, x_mean, t, *kept))
        x, x_mean = pc_loop(rng, x, sde, score_fn, predictor_cls, corrector_cls, snr, n_steps,
                            probability_flow, eps, project=bound, steps=(start, stop),
                            x_mean=x_mean)
        return rng, x, x_mean, kept

    def finish(carry):
        _, x, x_mean, _ = carry
        return inverse_scaler(x_mean if denoise else x)

    return LoopParts(init, advance, finish, sde.N,
                     pc_nfe(sde, predictor_cls, corrector_cls, n_steps))


def get_pc_sampler(sde: sde_lib.SDE, shape: Sequence[int], predictor, corrector,
                   inverse_scaler: Callable, snr: float, n_steps: int = 1,
                   probability_flow: bool = False, denoise: bool = True, eps: float = 1e-3):
    """Predictor-corrector sampler (Algorithm 1), compiled into one XLA program.

    Args:
      sde: the forward SDE.
      shape: sample shape [B, ...].
      predictor, corrector: registered names, `Predictor` / `Corrector` subclasses, or None.
      inverse_scaler: maps model space back to data space (elementwise).
      snr: signal-to-noise ratio of the corrector.
      n_steps: corrector steps per noise level.
      probability_flow: predict with the probability-flow ODE instead of the reverse SDE.
      denoise: return the last step's noise-free mean instead of the noisy sample.
      eps: the last (smallest) time.

    Returns:
      `sampler(rng, score_fn) -> (samples shaped `shape`, nfe)` where nfe counts score
      evaluations actually made (`pc_nfe`; the reference reports N (n_steps + 1) regardless).
      The same sampler in parts (progress between them): `get_pc_loop_parts`.
    """
    parts = get_pc_loop_parts(sde, shape, predictor, corrector, inverse_scaler, snr, n_steps,
                              probability_flow, denoise, eps)
    nfe = parts.nfe

    def sample(rng, score_fn):
        return run_loop_parts(parts, rng, score_fn)

    # score_fn is a static argument: one compiled program per score function object. Under an
    # outer jit the call inlines and a score_fn closing over traced parameters just works.
    compiled = jax.jit(sample, static_argnums=1)

    def sampler(rng, score_fn: ScoreFn):
        return compiled(rng, score_fn), nfe

    return sampler


def get_ode_sampler(sde: sde_lib.SDE, shape: Sequence[int], inverse_scaler: Callable,
                    denoise: bool = False, rtol: float = 1e-5, atol: float = 1e-5,
                    method: str = "dopri5", eps: float = 1e-3, max_steps: int = 16384):
    """Probability-flow ODE sampler (Eq. 13), integrated from T to eps by `ode.solve`.

    Args:
      method: an `ode` method: on device 'dopri5' (default), 'tsit5', 'bosh3'; on the host the
        scipy methods 'RK45' (the paper's and the reference's default), 'RK23', 'DOP853',
        'Radau', 'BDF', 'LSODA'. Host methods cannot run under jax.jit.
      denoise: finish with one reverse-diffusion step at eps and return its mean (one more
        score evaluation).
      max_steps: step budget of the device solvers; exceeding it raises an error.

    Returns:
      `sampler(rng, score_fn, z=None) -> (samples shaped `shape`, nfe)`. Starts from the latent
      `z` [shape] when given, else from the prior. `nfe` is the true number of score
      evaluations (an int32 array on device, an int on the host).
    """
    shape = tuple(int(s) for s in shape)
    method = ode.canonical_method(method)

    @functools.lru_cache(maxsize=8)
    def drift_fn(score_fn):
        rsde = sde.reverse(score_fn, probability_flow=True)
        return lambda t, x, args: rsde.sde(x, jnp.full((x.shape[0],), t, x.dtype))[0]

    def finish(x, score_fn):
        if not denoise:
            return inverse_scaler(x)
        # One reverse-diffusion step at eps removes the noise left at t = eps; keep its mean.
        t = jnp.full((shape[0],), eps, x.dtype)
        _, x_mean = ReverseDiffusionPredictor(sde, score_fn).update_fn(jax.random.key(0), x, t)
        return inverse_scaler(x_mean)

    if ode.is_host_method(method):
        finish_jit = jax.jit(finish, static_argnums=1)

        def sampler(rng, score_fn: ScoreFn, z=None):
            x = sde.prior_sampling(rng, shape) if z is None else jnp.asarray(z)
            x, nfe = ode.solve(drift_fn(score_fn), x, sde.T, eps, method, rtol, atol)
            return finish_jit(x, score_fn), nfe + int(denoise)

        return sampler

    def sample(rng, score_fn, z):
        x = sde.prior_sampling(rng, shape) if z is None else jnp.asarray(z)
        x, nfe = ode.solve(drift_fn(score_fn), x, sde.T, eps, method, rtol, atol, max_steps)
        return finish(x, score_fn), nfe + int(denoise)

    compiled = jax.jit(sample, static_argnums=1)

    def sampler(rng, score_fn: ScoreFn, z=None):
        return compiled(rng, score_fn, z)

    return sampler


# Sampling methods by `config.sampling.method`: factories
# `(config, sde, shape, inverse_scaler, eps) -> sampler(rng, score_fn) -> (samples, nfe)`.
_SAMPLERS: dict[str, Callable] = {}


def register_sampler(fn=None, *, name: str | None = None):
    """Function decorator adding a `config.sampling.method` (default name: the function's).

    The factory is called as `factory(config, sde, shape, inverse_scaler, eps)` and returns
    `sampler(rng, score_fn) -> (samples shaped `shape`, nfe)` (see `get_sampling_fn`).
    """
    _import_builtin_samplers()  # a clash with a built-in name fails here, at the decorator
    return _register(_SAMPLERS, "sampling method", fn, name=name)


def _import_builtin_samplers():
    # The few-step samplers ('ddim', 'dpm_solver', 'heun') live in fast_samplers, which builds
    # on this module and registers them when imported. Imported at the first lookup, not at
    # the top, so that neither module imports the other while it is being defined.
    import fast_samplers  # noqa: F401


def registered_samplers() -> list[str]:
    """The `config.sampling.method` names: 'pc', 'ode', the few-step samplers, plugins'."""
    _import_builtin_samplers()
    return sorted(_SAMPLERS)


def get_sampler(name: str) -> Callable:
    """The sampler factory registered under `name`; ValueError lists the valid names."""
    _import_builtin_samplers()
    if name not in _SAMPLERS:
        raise ValueError(f"Unknown sampling method {name!r}; valid names: {sorted(_SAMPLERS)}.")
    return _SAMPLERS[name]


def _builtin_sampler(name: str):
    # This module's own samplers skip register_sampler, whose import of fast_samplers would
    # run while this module is still being defined.
    return functools.partial(_register, _SAMPLERS, "sampling method", name=name)


def pc_settings(config) -> dict:
    """The PC sampler's settings in config.sampling, as keyword arguments of `get_pc_sampler`,
    `get_pc_loop_parts` and the controllable generation samplers: predictor, corrector, snr,
    n_steps (n_steps_each), probability_flow, denoise (noise_removal)."""
    cfg = config.sampling
    return dict(predictor=cfg.predictor, corrector=cfg.corrector, snr=cfg.snr,
                n_steps=cfg.n_steps_each, probability_flow=cfg.probability_flow,
                denoise=cfg.noise_removal)


@_builtin_sampler("pc")
def _pc_from_config(config, sde, shape, inverse_scaler, eps):
    return get_pc_sampler(sde, shape, inverse_scaler=inverse_scaler, eps=eps,
                          **pc_settings(config))


@_builtin_sampler("ode")
def _ode_from_config(config, sde, shape, inverse_scaler, eps):
    cfg = config.sampling
    return get_ode_sampler(sde, shape, inverse_scaler, denoise=cfg.noise_removal,
                           rtol=cfg.get("ode_rtol", 1e-5), atol=cfg.get("ode_atol", 1e-5),
                           method=cfg.get("ode_method", "dopri5"), eps=eps)


def get_sampling_fn(config, sde: sde_lib.SDE, shape: Sequence[int], inverse_scaler: Callable,
                    eps: float):
    """Builds the sampler named by `config.sampling.method` (see `register_sampler`).

    'pc' reads config.sampling.{predictor, corrector, snr, n_steps_each, noise_removal,
    probability_flow}; 'ode' reads {noise_removal, ode_method, ode_rtol, ode_atol}; the
    few-step samplers of `fast_samplers` ('ddim', 'dpm_solver', 'heun', 'sde_dpm_solver',
    'unipc', 'ipndm') read {num_steps, schedule, rho, eta, order, churn, unipc_variant,
    ipndm_variable_steps, noise_removal}.
    """
    return get_sampler(config.sampling.method.lower())(config, sde, tuple(shape), inverse_scaler,
                                                       eps)
