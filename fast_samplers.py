"""Few-step samplers for every SDE with a Gaussian marginal: DDIM, DPM-Solver++ and EDM's Heun.

Written after the paper: DDIM (Song, Meng & Ermon 2021), DPM-Solver++ multistep (Lu et al.
2022, Algorithm 2 and the third-order multistep update of github LuChengTHU/dpm-solver) and
the Heun sampler with the Karras rho schedule (Karras et al. 2022, Algorithms 1-2,
github NVlabs/edm). Each is written once against the Gaussian marginal of the forward SDE,

    x_t = alpha(t) x_0 + sigma(t) z,   lambda(t) = log(alpha(t) / sigma(t)),

read from the SDE object (`sde.marginal_coefficients`, `sde.half_log_snr`,
`sde.t_from_half_log_snr`, which default to what `marginal_prob` implies). A researcher's SDE
with a Gaussian perturbation kernel therefore works unchanged. The network enters only through
the score: the data prediction (Tweedie) is x0_hat(x, t) = (x + sigma(t)^2 score(x, t)) /
alpha(t).

Every sampler integrates from t = T down to t = eps over a time grid chosen by a schedule
(`time_grid`), runs as one `lax.scan` program (one compile per sampler and score function) and
reports its true number of score evaluations (NFE, a Python int):
- 'ddim' (`get_ddim_sampler`): num_steps NFE. eta = 0 is the deterministic DDIM, the exact
  first-order solver of the probability-flow ODE in lambda; eta = 1 has DDPM's posterior noise.
- 'dpm_solver' (`get_dpm_solver_sampler`): DPM-Solver++ multistep of order 1-3 (1 equals
  DDIM with eta = 0); num_steps NFE.
- 'heun' (`get_heun_sampler`): EDM's second-order Heun method on the rescaled ODE
  d(x / alpha) / d(sigma / alpha) = (x / alpha - x0_hat) / (sigma / alpha); 2 num_steps NFE;
  optional stochastic churn (Algorithm 2).
`denoise=True` adds one NFE: the sample returned is x0_hat at eps (EDM's last step to
noise level 0, DPM-Solver's `denoise_to_zero`).

They are registered as `config.sampling.method` names in `sampling` (which imports this module
at its first sampler lookup, so the built-ins are always there), alongside 'pc' and 'ode'. A
new sampler is added the same way, from any module (docs/extending.md):

    @sampling.register_sampler(name='my_sampler')
    def my_sampler(config, sde, shape, inverse_scaler, eps):
        return sampler  # sampler(rng, score_fn) -> (samples, nfe)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import sampling
import sde_lib

ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]

SCHEDULES = ("logsnr", "time_uniform", "time_quadratic", "karras")
DEFAULT_SCHEDULES = {"ddim": "time_uniform", "dpm_solver": "logsnr", "heun": "karras"}
# DPM-Solver lowers the order of the final multistep updates for short runs, where they are
# unstable (LuChengTHU/dpm-solver, `lower_order_final` with fewer than 10 steps).
LOWER_ORDER_FINAL_BELOW = 10


def _float():
    """The float dtype samplers compute in: float32, or float64 under `jax.enable_x64`."""
    return jnp.result_type(float)


def _evaluate(fn, values) -> tuple[np.ndarray, ...]:
    """fn (an SDE method, elementwise in t) at float64 `values` [n]: a tuple of float64 [n].

    The input is padded to a power-of-two length (at least 64) so that building samplers with
    many different step counts reuses the same compiled kernels (eager jnp ops compile once
    per shape, which would otherwise dominate a sampler's construction).
    """
    values = np.asarray(values, np.float64).reshape(-1)
    n = len(values)
    size = max(64, 1 << (n - 1).bit_length())
    padded = np.concatenate([values, np.full(size - n, values[-1])])
    out = fn(jnp.asarray(padded, _float()))
    return tuple(np.array(o, np.float64)[:n] for o in (out if isinstance(out, tuple) else (out,)))


def check_schedule(schedule: str) -> str:
    if schedule not in SCHEDULES:
        raise ValueError(f"Unknown time schedule {schedule!r}; valid: {list(SCHEDULES)}.")
    return schedule


def _check_steps(num_steps) -> int:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}.")
    return int(num_steps)


def time_grid(sde: sde_lib.SDE, num_steps: int, eps: float, schedule: str = "logsnr",
              rho: float = 7.0) -> np.ndarray:
    """The times T = t_0 > t_1 > ... > t_M = eps of an M-step sampler: float64 [M + 1].

    'logsnr': uniform in lambda (DPM-Solver's 'logSNR'); 'time_uniform': uniform in t;
    'time_quadratic': uniform in sqrt(t) (DPM-Solver's 'time_quadratic', DDIM's 'quad');
    'karras': EDM's Eq. 5, uniform in (sigma / alpha)^(1 / rho).
    """
    check_schedule(schedule)
    M, T = _check_steps(num_steps), float(sde.T)
    if not 0 < eps < T:
        raise ValueError(f"eps must lie in (0, T = {T}), got {eps}.")
    frac = np.linspace(0.0, 1.0, M + 1)
    lam_T, lam_eps = _evaluate(sde.half_log_snr, [T, eps])[0]
    if schedule == "time_uniform":
        t = T + frac * (eps - T)
    elif schedule == "time_quadratic":
        t = (math.sqrt(T) + frac * (math.sqrt(eps) - math.sqrt(T))) ** 2
    else:
        if schedule == "logsnr":
            lam = lam_T + frac * (lam_eps - lam_T)
        else:
            if rho <= 0:
                raise ValueError(f"rho must be > 0, got {rho}.")
            # sigma / alpha = exp(-lambda) is EDM's noise level of the rescaled x / alpha.
            s_max, s_min = math.exp(-lam_T) ** (1 / rho), math.exp(-lam_eps) ** (1 / rho)
            lam = -rho * np.log(s_max + frac * (s_min - s_max))
        t = _evaluate(sde.t_from_half_log_snr, lam)[0]
    t[0], t[-1] = T, eps  # exact end points whatever the inverse's rounding
    t = np.asarray(t, _float()).astype(np.float64)  # the times the network will see
    if not np.all(np.diff(t) < 0):
        raise ValueError(f"The {schedule!r} schedule with {M} steps from T = {T} to eps = {eps} "
                         f"repeats times at {np.dtype(_float()).name} resolution; use fewer steps.")
    return t


def _coefficients(sde: sde_lib.SDE, t: np.ndarray, grid: bool = True):
    """(alpha, sigma, lambda) at times t, float64 [len(t)].

    lambda is recomputed from the alpha and sigma the samplers use, so the update
    coefficients stay exactly consistent with one another (DDIM is then exact for a constant
    x0_hat). On a `grid` (times decreasing), lambda must increase.
    """
    alpha, sigma = _evaluate(sde.marginal_coefficients, t)
    lam = np.log(alpha) - np.log(sigma)
    ok = np.all(alpha > 0) and np.all(sigma > 0) and np.all(np.isfinite(lam))
    if not ok or (grid and not np.all(np.diff(lam) > 0)):
        raise ValueError(f"{type(sde).__name__}'s marginal must have alpha > 0, sigma > 0 and "
                         "log(alpha / sigma) decreasing in t on [eps, T] for these samplers.")
    return alpha, sigma, lam


def _data_prediction(score_fn: ScoreFn, x, t, alpha, sigma):
    """Tweedie's x0_hat = (x + sigma^2 score(x, t)) / alpha at one time t for the whole batch."""
    tb = jnp.full((x.shape[0],), t, x.dtype)
    return (x + sigma**2 * score_fn(x, tb)) / alpha


def _compile(shape, start, loop, finish, sde, inverse_scaler, stochastic: bool):
    """jit of sample(rng, score_fn, z): prior (or z) -> `loop` -> `finish` -> inverse_scaler.

    score_fn is static: one program per score function object, inlined under an outer jit
    (so a score function closing over traced parameters works, as for the PC sampler).
    """

    def sample(rng, score_fn, z):
        if rng is None and (z is None or stochastic):
            raise ValueError("This sampler needs an rng (rng=None only works for a "
                             "deterministic sampler started from a given z).")
        prior_rng, loop_rng = (None, None) if rng is None else jax.random.split(rng)
        x = sde.prior_sampling(prior_rng, shape) if z is None else jnp.asarray(z)
        x = loop(loop_rng, start(x), score_fn)
        return inverse_scaler(finish(x, score_fn))

    return jax.jit(sample, static_argnums=1)


def _multistep_sampler(sde, shape, inverse_scaler, t, a, c, noise, denoise):
    """The loop DDIM and DPM-Solver++ share. For step i (t_i -> t_{i+1}), with the data
    predictions m_i, m_{i-1}, m_{i-2} at the last three grid times,
    x_{i+1} = a_i x_i + c_i0 m_i + c_i1 m_{i-1} + c_i2 m_{i-2} + noise_i z_i.

    t [M + 1]; a, noise [M]; c [M, K] with K <= 3 past predictions used.
    """
    shape = tuple(int(s) for s in shape)
    alpha, sigma, _ = _coefficients(sde, t)
    K = c.shape[1]
    tables = tuple(jnp.asarray(v, _float()) for v in (t[:-1], alpha[:-1], sigma[:-1], a, c,
                                                         noise))
    stochastic = bool(np.any(noise > 0))

    def loop(rng, x, score_fn):
        def step(carry, xs):
            x, past = carry
            i, (t_i, alpha_i, sigma_i, a_i, c_i, noise_i) = xs
            m = _data_prediction(score_fn, x, t_i, alpha_i, sigma_i)
            past = (m,) + past[:K - 1]
            x = a_i * x + sum(c_i[k] * past[k] for k in range(K))
            if stochastic:
                x = x + noise_i * jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
            return (x, past), None

        past = tuple(jnp.zeros_like(x) for _ in range(K))
        (x, _), _ = jax.lax.scan(step, (x, past), (jnp.arange(len(a)), tables))
        return x

    def finish(x, score_fn):
        return _data_prediction(score_fn, x, t[-1], alpha[-1], sigma[-1]) if denoise else x

    compiled = _compile(shape, lambda x: x, loop, finish, sde, inverse_scaler, stochastic)
    nfe = len(a) + int(denoise)

    def sampler(rng, score_fn: ScoreFn, z=None):
        return compiled(rng, score_fn, z), nfe

    return sampler


def ddim_coefficients(alpha, sigma, eta: float = 0.0):
    """DDIM's update x_t = alpha_t x0_hat + sqrt(sigma_t^2 - c^2) eps_hat + c z (Song et al.
    2021, Eq. 12) for every grid step s -> t, with eps_hat = (x_s - alpha_s x0_hat) / sigma_s
    and c = eta sigma_t sqrt(1 - (alpha_s sigma_t / (alpha_t sigma_s))^2), DDPM's posterior
    std at eta = 1. Returns (a [M], b [M], noise [M]): x_t = a x_s + b x0_hat + noise z.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"DDIM's eta must lie in [0, 1], got {eta}.")
    a_s, a_t, s_s, s_t = alpha[:-1], alpha[1:], sigma[:-1], sigma[1:]
    noise = eta * s_t * np.sqrt(np.clip(1.0 - (a_s * s_t / (a_t * s_s)) ** 2, 0.0, None))
    kept = np.sqrt(np.clip(s_t**2 - noise**2, 0.0, None))  # the deterministic noise part
    return kept / s_s, a_t - kept * a_s / s_s, noise


def get_ddim_sampler(sde: sde_lib.SDE, shape: Sequence[int], inverse_scaler: Callable,
                     num_steps: int, eta: float = 0.0, schedule: str = "time_uniform",
                     denoise: bool = False, eps: float = 1e-3, rho: float = 7.0):
    """DDIM over `num_steps` steps of `schedule` (see `time_grid`) from T to eps.

    Returns `sampler(rng, score_fn, z=None) -> (samples shaped `shape`, nfe)`, starting from the
    latent z [shape] when given, else from the prior; nfe = num_steps + denoise.
    """
    t = time_grid(sde, num_steps, eps, schedule, rho)
    alpha, sigma, _ = _coefficients(sde, t)
    a, b, noise = ddim_coefficients(alpha, sigma, float(eta))
    return _multistep_sampler(sde, shape, inverse_scaler, t, a, b[:, None], noise, denoise)


def dpm_solver_coefficients(alpha, sigma, lam, order: int, lower_order_final: bool = True):
    """DPM-Solver++ multistep updates (Lu et al. 2022, Algorithm 2 for order 2; the official
    third-order multistep update for 3) as x_{i+1} = a_i x_i + sum_k c_ik m_{i-k}.

    The first steps use the orders their history allows (1, then 2); with fewer than
    LOWER_ORDER_FINAL_BELOW steps and `lower_order_final` the last ones drop to order 1-2.
    Returns (a [M], c [M, order]).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order!r}.")
    M = len(lam) - 1
    a = sigma[1:] / sigma[:-1]
    c = np.zeros((M, order))
    for i in range(M):
        k = min(order, i + 1)
        if lower_order_final and M < LOWER_ORDER_FINAL_BELOW:
            k = min(k, M - i)
        h = lam[i + 1] - lam[i]
        phi1 = np.expm1(-h)  # exact integration of the linear part: e^{-h} - 1
        first = np.array([1.0, 0.0, 0.0])
        if k == 1:
            coef = -phi1 * first
        elif k == 2:
            # D = m_i + (m_i - m_{i-1}) / (2 r0): a linear extrapolation of x0_hat in lambda.
            r0 = (lam[i] - lam[i - 1]) / h
            coef = -phi1 * (first + np.array([1.0, -1.0, 0.0]) / (2 * r0))
        else:
            r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
            d1_0 = np.array([1.0, -1.0, 0.0]) / r0  # first divided differences
            d1_1 = np.array([0.0, 1.0, -1.0]) / r1
            d2 = (d1_0 - d1_1) / (r0 + r1)
            d1 = d1_0 + r0 * d2
            phi2 = phi1 / h + 1.0
            phi3 = phi2 / h - 0.5
            coef = -phi1 * first + phi2 * d1 - 2 * phi3 * d2
        c[i] = alpha[i + 1] * coef[:order]
    return a, c


def get_dpm_solver_sampler(sde: sde_lib.SDE, shape: Sequence[int], inverse_scaler: Callable,
                           num_steps: int, order: int = 2, schedule: str = "logsnr",
                           denoise: bool = False, eps: float = 1e-3, rho: float = 7.0,
                           lower_order_final: bool = True):
    """DPM-Solver++(order)M: multistep, data prediction, `num_steps` steps of `schedule`.

    Returns `sampler(rng, score_fn, z=None) -> (samples shaped `shape`, nfe)`; nfe =
    num_steps + denoise (one score evaluation per step: earlier ones are reused).
    """
    t = time_grid(sde, num_steps, eps, schedule, rho)
    alpha, sigma, lam = _coefficients(sde, t)
    a, c = dpm_solver_coefficients(alpha, sigma, lam, int(order), lower_order_final)
    return _multistep_sampler(sde, shape, inverse_scaler, t, a, c, np.zeros_like(a), denoise)


def heun_churn(levels, churn: float, s_tmin: float = 0.0, s_tmax: float = math.inf):
    """EDM's gamma_i = min(S_churn / M, sqrt(2) - 1) for S_tmin <= level_i <= S_tmax (Alg. 2),
    capped so the raised level stays within the schedule (the network is trained up to T).

    levels: noise levels sigma / alpha [M + 1]. Returns gamma [M].
    """
    if churn < 0:
        raise ValueError(f"churn must be >= 0, got {churn}.")
    M = len(levels) - 1
    current = levels[:-1]
    gamma = np.where((current >= s_tmin) & (current <= s_tmax),
                     min(churn / M, math.sqrt(2.0) - 1.0), 0.0)
    return np.minimum(gamma, levels[0] / current - 1.0)


def get_heun_sampler(sde: sde_lib.SDE, shape: Sequence[int], inverse_scaler: Callable,
                     num_steps: int, churn: float = 0.0, schedule: str = "karras",
                     rho: float = 7.0, denoise: bool = False, eps: float = 1e-3,
                     s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0):
    """EDM's Heun sampler (Karras et al. 2022, Algorithm 1; Algorithm 2 with churn > 0).

    Integrates the probability-flow ODE in the rescaled variable y = x / alpha, whose noise
    level is s = sigma / alpha: dy/ds = (y - x0_hat) / s, over `num_steps` steps of `schedule`
    (EDM's rho schedule by default). Returns `sampler(rng, score_fn, z=None) -> (samples
    shaped `shape`, nfe)` with nfe = 2 num_steps + denoise.
    """
    shape = tuple(int(s) for s in shape)
    t = time_grid(sde, num_steps, eps, schedule, rho)
    alpha, sigma, lam = _coefficients(sde, t)
    level = np.exp(-lam)
    gamma = heun_churn(level, float(churn), s_tmin, s_tmax)
    # The raised level s_hat = s (1 + gamma) and the time the network sees there.
    level_hat = level[:-1] * (1.0 + gamma)
    t_hat, raised = t[:-1].copy(), gamma > 0
    if np.any(raised):
        t_hat[raised] = _evaluate(sde.t_from_half_log_snr, -np.log(level_hat[raised]))[0]
    alpha_hat, sigma_hat, lam_hat = _coefficients(sde, np.minimum(t_hat, t[0]), grid=False)
    level_hat = np.exp(-lam_hat)  # as the network's time t_hat implies it
    kick = s_noise * np.sqrt(np.clip(level_hat**2 - level[:-1] ** 2, 0.0, None))
    tables = tuple(jnp.asarray(v, _float()) for v in (
        t_hat, alpha_hat, sigma_hat, level_hat, kick, t[1:], alpha[1:], sigma[1:], level[1:]))
    stochastic = bool(np.any(kick > 0))

    def loop(rng, y, score_fn):
        def step(y, xs):
            i, (t0, a0, s0, l0, kick_i, t1, a1, s1, l1) = xs
            if stochastic:  # churn: raise the noise level from level_i to l0 (Alg. 2, l. 5-6)
                y = y + kick_i * jax.random.normal(jax.random.fold_in(rng, i), y.shape, y.dtype)
            # Euler step from l0 to l1 (Alg. 1, l. 4-5) ...
            d0 = (y - _data_prediction(score_fn, a0 * y, t0, a0, s0)) / l0
            y_euler = y + (l1 - l0) * d0
            # ... corrected by the trapezoidal rule (Alg. 1, l. 7-8).
            d1 = (y_euler - _data_prediction(score_fn, a1 * y_euler, t1, a1, s1)) / l1
            return y + (l1 - l0) * 0.5 * (d0 + d1), None

        y, _ = jax.lax.scan(step, y, (jnp.arange(len(t) - 1), tables))
        return alpha[-1] * y  # back to x at eps

    def finish(x, score_fn):
        return _data_prediction(score_fn, x, t[-1], alpha[-1], sigma[-1]) if denoise else x

    compiled = _compile(shape, lambda x: x / alpha[0], loop, finish, sde, inverse_scaler,
                        stochastic)
    nfe = 2 * (len(t) - 1) + int(denoise)

    def sampler(rng, score_fn: ScoreFn, z=None):
        return compiled(rng, score_fn, z), nfe

    return sampler


def _schedule(cfg, method: str) -> str:
    schedule = cfg.get("schedule", "default")
    return DEFAULT_SCHEDULES[method] if schedule in ("default", "", None) else schedule


@sampling.register_sampler(name="ddim")
def _ddim_from_config(config, sde, shape, inverse_scaler, eps):
    cfg = config.sampling
    return get_ddim_sampler(sde, shape, inverse_scaler, cfg.get("num_steps", 20),
                            eta=cfg.get("eta", 0.0), schedule=_schedule(cfg, "ddim"),
                            denoise=cfg.noise_removal, eps=eps, rho=cfg.get("rho", 7.0))


@sampling.register_sampler(name="dpm_solver")
def _dpm_solver_from_config(config, sde, shape, inverse_scaler, eps):
    cfg = config.sampling
    return get_dpm_solver_sampler(sde, shape, inverse_scaler, cfg.get("num_steps", 20),
                                  order=cfg.get("order", 2),
                                  schedule=_schedule(cfg, "dpm_solver"),
                                  denoise=cfg.noise_removal, eps=eps, rho=cfg.get("rho", 7.0))


@sampling.register_sampler(name="heun")
def _heun_from_config(config, sde, shape, inverse_scaler, eps):
    cfg = config.sampling
    return get_heun_sampler(sde, shape, inverse_scaler, cfg.get("num_steps", 20),
                            churn=cfg.get("churn", 0.0), schedule=_schedule(cfg, "heun"),
                            rho=cfg.get("rho", 7.0), denoise=cfg.noise_removal, eps=eps)
