"""Few-step samplers for every SDE with a Gaussian marginal: DDIM, DPM-Solver++, EDM's Heun,
UniPC, iPNDM and SDE-DPM-Solver++.

Written after the paper: DDIM (Song, Meng & Ermon 2021), DPM-Solver++ multistep (Lu et al.
2022, Algorithm 2 and the third-order multistep update of github LuChengTHU/dpm-solver), its
stochastic variant SDE-DPM-Solver++ (Lu et al. 2022), the Heun sampler with the Karras rho
schedule (Karras et al. 2022, Algorithms 1-2, github NVlabs/edm), UniPC (Zhao et al. 2023,
"UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion Models") and
iPNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator").
Each is written once against the Gaussian marginal of the forward SDE,

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
- 'sde_dpm_solver' (`get_sde_dpm_solver_sampler`): SDE-DPM-Solver++ of order 1 (= DDIM with
  eta = 1) or 2 (2M), stochastic; num_steps NFE.
- 'unipc' (`get_unipc_sampler`): UniPC-p, p = 1-3, B(h) variant 'bh1' or 'bh2': the UniP
  predictor and the UniC corrector (order p + 1), which reuses the next step's evaluation;
  num_steps NFE.
- 'ipndm' (`get_ipndm_sampler`): iPNDM, Adams-Bashforth of order 1-4 on the rescaled ODE
  above in its noise prediction, with lower-order warm-up steps; num_steps NFE.
The multistep samplers (DPM-Solver++, SDE-DPM-Solver++, UniPC) drop to order 1 at the last
step and to at most 2 at the one before when run with fewer than LOWER_ORDER_FINAL_BELOW steps.
`denoise=True` adds one NFE: the sample returned is x0_hat at eps (EDM's last step to
noise level 0, DPM-Solver's `denoise_to_zero`). `thresholding` 'clip' or 'dynamic' maps every
data prediction x0_hat into the data range before it is used (`x0_thresholder`: DPM-Solver++'s
clipping and Imagen's dynamic thresholding, Lu et al. 2022 Sec. 5; Saharia et al. 2022); at
'none' (the default) the samplers are unchanged.

They are registered as `config.sampling.method` names in `sampling` (which imports this module
at its first sampler lookup, so the built-ins are always there), alongside 'pc' and 'ode'. A
new sampler is added the same way, from any module (docs/extending.md):

    @sampling.register_sampler(name='my_sampler')
    def my_sampler(config, sde, shape, inverse_scaler, eps):
        return sampler  # sampler(rng, score_fn) -> (samples, nfe)
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import sampling
import sde_lib
from sde_lib import ScoreFn

SCHEDULES = ("logsnr", "time_uniform", "time_quadratic", "karras")
DEFAULT_SCHEDULES = {"ddim": "time_uniform", "dpm_solver": "logsnr", "heun": "karras",
                     "sde_dpm_solver": "logsnr", "unipc": "logsnr", "ipndm": "karras"}
# The orders each multistep sampler has (`config.sampling.order`).
ORDERS = {"dpm_solver": (1, 2, 3), "sde_dpm_solver": (1, 2), "unipc": (1, 2, 3),
          "ipndm": (1, 2, 3, 4)}
UNIPC_VARIANTS = ("bh1", "bh2")
# What happens to each data prediction x0_hat (`x0_thresholder`).
THRESHOLDINGS = ("none", "clip", "dynamic")
# DPM-Solver lowers the order of the final multistep updates for short runs, where they are
# unstable (LuChengTHU/dpm-solver, `lower_order_final` with fewer than 10 steps: the last step
# is of order 1, the one before of order at most 2). The other multistep samplers here
# (SDE-DPM-Solver++, UniPC) follow the same rule.
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


def check_thresholding(thresholding: str, percentile: float = 0.995) -> str:
    if thresholding not in THRESHOLDINGS:
        raise ValueError(f"Unknown x0 thresholding {thresholding!r}; valid: "
                         f"{list(THRESHOLDINGS)}.")
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"The thresholding percentile must lie in (0, 1], got {percentile}.")
    return thresholding


def x0_thresholder(thresholding: str = "none", percentile: float = 0.995,
                   data_range: tuple[float, float] | None = None,
                   inverse_scaler: Callable | None = None) -> Callable | None:
    """The map applied to every data prediction x0_hat [B, ...], or None for 'none'.

    `data_range` (low, high) is the data's range in the model's space; None: the range that
    the affine `inverse_scaler` maps onto [0, 1] (the project's scalers: [-1, 1] for centred
    data, else [0, 1]), or [-1, 1] without one.

    'clip': x0_hat clipped to `data_range` (the model's data range; DPM-Solver++, Lu et al.
    2022, Sec. 5, for pixel-space models). 'dynamic': Imagen's dynamic thresholding (Saharia et
    al. 2022, Sec. 2.3), written for a range of centre c and half-width r: with u = (x0_hat -
    c) / r and s = max(1, the `percentile` quantile of |u| over each sample), x0_hat becomes
    c + r clip(u, -s, s) / s. Both leave an x0_hat inside the range unchanged ('dynamic' then
    has s = 1 and is 'clip').
    """
    check_thresholding(thresholding, percentile)
    if thresholding == "none":
        return None
    if data_range is None and inverse_scaler is not None:
        at0, at1 = (float(np.asarray(inverse_scaler(np.float64(v)))) for v in (0.0, 1.0))
        data_range = sorted(((0.0 - at0) / (at1 - at0), (1.0 - at0) / (at1 - at0)))
    lo, hi = (float(v) for v in (data_range or (-1.0, 1.0)))
    if not lo < hi:
        raise ValueError(f"data_range must be (low, high) with low < high, got {data_range}.")
    if thresholding == "clip":
        return lambda x0: jnp.clip(x0, lo, hi)
    centre, half = (hi + lo) / 2, (hi - lo) / 2

    def dynamic(x0):
        u = (x0 - centre) / half
        s = jnp.quantile(jnp.abs(u).reshape(u.shape[0], -1), percentile, axis=1)
        s = jnp.maximum(s, 1.0).reshape((-1,) + (1,) * (u.ndim - 1)).astype(u.dtype)
        return centre + half * jnp.clip(u, -s, s) / s

    return dynamic


def _data_prediction(score_fn: ScoreFn, x, t, alpha, sigma, x0_fn: Callable | None = None):
    """Tweedie's x0_hat = (x + sigma^2 score(x, t)) / alpha at one time t for the whole batch,
    passed through `x0_fn` (`x0_thresholder`) when given."""
    tb = jnp.full((x.shape[0],), t, x.dtype)
    x0 = (x + sigma**2 * score_fn(x, tb)) / alpha
    return x0 if x0_fn is None else x0_fn(x0)


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


def _check_order(method: str, order) -> int:
    if isinstance(order, bool) or order not in ORDERS[method]:
        raise ValueError(f"{method} order must be one of {list(ORDERS[method])}, got {order!r}.")
    return int(order)


def _step_orders(M: int, order: int, lower_order_final: bool) -> list[int]:
    """The order of each of M multistep updates: what the history allows at the start
    (1, 2, ...), and with fewer than LOWER_ORDER_FINAL_BELOW steps and `lower_order_final`,
    at most M - i at step i (order 1 at the last step, at most 2 at the one before)."""
    final = lower_order_final and M < LOWER_ORDER_FINAL_BELOW
    return [min(order, i + 1, M - i) if final else min(order, i + 1) for i in range(M)]


def _multistep_sampler(sde, shape, inverse_scaler, t, a, c, noise, denoise,
                       history: str = "data", x0_fn: Callable | None = None):
    """The loop the multistep samplers share. For step i (t_i -> t_{i+1}), with the model's
    predictions p_i, p_{i-1}, ... at the last K grid times,
    x_{i+1} = a_i x_i + c_i0 p_i + c_i1 p_{i-1} + ... + noise_i z_i.

    `history` 'data': p is the data prediction x0_hat; 'noise': the noise prediction
    eps_hat = (x - alpha x0_hat) / sigma (iPNDM). t [M + 1]; a, noise [M]; c [M, K].
    x0_fn: the map of every data prediction (`x0_thresholder`), or None.
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
            m = _data_prediction(score_fn, x, t_i, alpha_i, sigma_i, x0_fn)
            if history == "noise":
                m = (x - alpha_i * m) / sigma_i
            past = (m,) + past[:K - 1]
            x = a_i * x + sum(c_i[k] * past[k] for k in range(K))
            if stochastic:
                x = x + noise_i * jax.random.normal(jax.random.fold_in(rng, i), x.shape, x.dtype)
            return (x, past), None

        past = tuple(jnp.zeros_like(x) for _ in range(K))
        (x, _), _ = jax.lax.scan(step, (x, past), (jnp.arange(len(a)), tables))
        return x

    def finish(x, score_fn):
        return _data_prediction(score_fn, x, t[-1], alpha[-1], sigma[-1],
                                x0_fn) if denoise else x

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
                     denoise: bool = False, eps: float = 1e-3, rho: float = 7.0,
                     thresholding: str = "none", threshold_percentile: float = 0.995,
                     data_range: tuple[float, float] | None = None):
    """DDIM over `num_steps` steps of `schedule` (see `time_grid`) from T to eps.

    Returns `sampler(rng, score_fn, z=None) -> (samples shaped `shape`, nfe)`, starting from the
    latent z [shape] when given, else from the prior; nfe = num_steps + denoise.
    """
    t = time_grid(sde, num_steps, eps, schedule, rho)
    alpha, sigma, _ = _coefficients(sde, t)
    a, b, noise = ddim_coefficients(alpha, sigma, float(eta))
    return _multistep_sampler(sde, shape, inverse_scaler, t, a, b[:, None], noise, denoise,
                              x0_fn=x0_thresholder(thresholding, threshold_percentile, data_range,
                                                   inverse_scaler))


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
    for i, k in enumerate(_step_orders(M, order, lower_order_final)):
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
                           lower_order_final: bool = True,
                           thresholding: str = "none", threshold_percentile: float = 0.995,
                           data_range: tuple[float, float] | None = None):
    """DPM-Solver++(order)M: multistep, data prediction, `num_steps` steps of `schedule`.

    Returns `sampler(rng, score_fn, z=None) -> (samples shaped `shape`, nfe)`; nfe =
    num_steps + denoise (one score evaluation per step: earlier ones are reused).
    """
    t = time_grid(sde, num_steps, eps, schedule, rho)
    alpha, sigma, lam = _coefficients(sde, t)
    a, c = dpm_solver_coefficients(alpha, sigma, lam, int(order), lower_order_final)
    return _multistep_sampler(sde, shape, inverse_scaler, t, a, c, np.zeros_like(a), denoise,
                              x0_fn=x0_thresholder(thresholding, threshold_percentile, data_range,
                                                   inverse_scaler))


def sde_dpm_solver_coefficients(alpha, sigma, lam, order: int, lower_order_final: bool = True):
    """SDE-DPM-Solver++ (Lu et al. 2022, the stochastic DPM-Solver++; 'sde-dpmsolver++' of
    github huggingface/diffusers) as x_{i+1} = a_i x_i + sum_k c_ik m_{i-k} + noise_i z_i.

    In lambda the reverse SDE with the data prediction x0 is linear in x; its exact solution
    from s to t (h = lambda_t - lambda_s) is
    x_t = (sigma_t / sigma_s) e^{-h} x_s + alpha_t int_0^h 2 e^{-2 (h - u)} x0(lambda_s + u) du
          + sigma_t sqrt(1 - e^{-2 h}) z.
    Order 1 holds x0 constant over the step (DDIM with eta = 1); 2M adds the midpoint term
    (1 - e^{-2 h}) D1 / 2 with D1 = (m_i - m_{i-1}) / r, r = (lambda_i - lambda_{i-1}) / h,
    as DPM-Solver++(2M) does. Warm-up and final orders as `dpm_solver_coefficients`.
    Returns (a [M], c [M, order], noise [M]).
    """
    order = _check_order("sde_dpm_solver", order)
    M = len(lam) - 1
    h = np.diff(lam)
    gain = -np.expm1(-2.0 * h)  # 1 - e^{-2h}
    a = sigma[1:] / sigma[:-1] * np.exp(-h)
    c = np.zeros((M, order))
    for i, k in enumerate(_step_orders(M, order, lower_order_final)):
        coef = np.array([1.0, 0.0])
        if k == 2:
            r0 = (lam[i] - lam[i - 1]) / h[i]
            coef = coef + np.array([1.0, -1.0]) / (2 * r0)
        c[i] = alpha[i + 1] * gain[i] * coef[:order]
    return a, c, sigma[1:] * np.sqrt(gain)


def get_sde_dpm_solver_sampler(sde: sde_lib.SDE, shape: Sequence[int],
                               inverse_scaler: Callable, num_steps: int, order: int = 2,
                               schedule: str = "logsnr", denoise: bool = False,
                               eps: float = 1e-3, rho: float = 7.0,
                               lower_order_final: bool = True,
                               thresholding: str = "none", threshold_percentile: float = 0.995,
                               data_range: tuple[float, float] | None = None):
    """SDE-DPM-Solver++(order; 2 = 2M), stochastic, `num_steps` steps of `schedule`.

    Returns `sampler(rng, score_fn, z=None) -> (samples shaped `shape`, nfe)`; nfe =
    num_steps + denoise. Needs an rng (it draws noise at every step).
    """
    t = time_grid(sde, num_steps, eps, schedule, rho)
    alpha, sigma, lam = _coefficients(sde, t)
    a, c, noise = sde_dpm_solver_coefficients(alpha, sigma, lam, order, lower_order_final)
    return _multistep_sampler(sde, shape, inverse_scaler, t, a, c, noise, denoise,
                              x0_fn=x0_thresholder(thresholding, threshold_percentile, data_range,
                                                   inverse_scaler))


def _unipc_weights(r, h: float, variant: str) -> tuple[float, np.ndarray]:
    """UniPC's B(h) and weights rho on the differences D_k = (m(r_k) - m_0) / r_k, k <= n
    (Zhao et al. 2023, Alg. 2-3, data prediction): rho solves
    sum_k rho_k r_k^(j-1) = j! (-h) phi_{j+1}(-h) / B(h), j = 1..n, with the exponential
    integrator's phi_k(z) = sum_i z^i / (i + k)!, so that -alpha_t B(h) sum_k rho_k D_k
    integrates the first n Taylor terms of x0(lambda) exactly. With n = 1 the paper (and its
    code, github wl-zhao/UniPC) takes rho = 1/2. B(h) = -h ('bh1') or e^{-h} - 1 ('bh2')."""
    hh = -h
    B = hh if variant == "bh1" else math.expm1(hh)
    n = len(r)
    if n == 1:
        return B, np.array([0.5])
    b, phi, factorial = [], math.expm1(hh) / hh - 1.0, 1.0  # phi = hh phi_2(hh)
    for j in range(1, n + 1):
        b.append(phi * factorial / B)
        factorial *= j + 1
        phi = phi / hh - 1.0 / factorial  # hh phi_{j+2}(hh)
    R = np.vander(np.asarray(r, np.float64), n, increasing=True).T  # R[j, k] = r_k^j
    return B, np.linalg.solve(R, np.array(b))


def unipc_coefficients(alpha, sigma, lam, order: int, variant: str = "bh2",
                       lower_order_final: bool = True):
    """UniPC (Zhao et al. 2023), data prediction, B(h) `variant`, predictor UniP-p and
    corrector UniC-p with p = the step's order (warm-up and final orders as
    `dpm_solver_coefficients`).

    Step i predicts x~_{i+1} = a_i x_i + sum_k P_ik m_{i-k} (UniP-p, P [M, order]). The model
    is then evaluated at x~_{i+1}, giving m_{i+1}, and UniC-p replaces the prediction by
    x_{i+1} = x~_{i+1} + sum_k C_{i+1,k} m_{i+1-k} (C [M, order + 1], row 0 zero: the
    corrector of step i runs at the start of step i + 1, reusing its model evaluation, so
    the last step is not corrected and NFE = M). m_{i+1}, evaluated at the predicted point,
    is the one kept in the history. Returns (a [M], P, C).
    """
    _check_order("unipc", order)
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"UniPC variant must be one of {list(UNIPC_VARIANTS)}, got {variant!r}.")
    M = len(lam) - 1
    a = sigma[1:] / sigma[:-1]
    P, C = np.zeros((M, order)), np.zeros((M, order + 1))
    for i, p in enumerate(_step_orders(M, order, lower_order_final)):
        h = lam[i + 1] - lam[i]
        r = [(lam[i - k] - lam[i]) / h for k in range(1, p)]
        # Both start from x_ = a_i x_i - alpha_{i+1} (e^{-h} - 1) m_i (order 1, DDIM); UniP-p
        # adds - alpha_{i+1} B sum_k rho_k D_k, D_k = (m_{i-k} - m_i) / r_k.
        B, rho = _unipc_weights(r, h, variant) if p > 1 else (0.0, np.zeros(0))
        pred = np.zeros(order)
        pred[0] = -math.expm1(-h)
        for k in range(1, p):
            pred[k] -= B * rho[k - 1] / r[k - 1]
            pred[0] += B * rho[k - 1] / r[k - 1]
        P[i] = alpha[i + 1] * pred
        if i + 1 < M:
            # UniC-p: x_{i+1} = x_ - alpha_{i+1} B (sum_k rho^c_k D_k + rho^c_p D_new) with
            # D_new = m_{i+1} - m_i (r = 1); written as a correction of the prediction, on
            # [m_{i+1}, m_i, ..., m_{i+1-p}].
            B, rho_c = _unipc_weights(r + [1.0], h, variant)
            corr = np.zeros(order + 1)
            corr[0] -= B * rho_c[-1]
            corr[1] += B * rho_c[-1]
            for k in range(1, p):
                w = B * (rho_c[k - 1] - rho[k - 1]) / r[k - 1]
                corr[k + 1] -= w
                corr[1] += w
            C[i + 1] = alpha[i + 1] * corr
    return a, P, C


def get_unipc_sampler(sde: sde_lib.SDE, shape: Sequence[int], inverse_scaler: Callable,
                      num_steps: int, order: int = 2, variant: str = "bh2",
                      schedule: str = "logsnr", denoise: bool = False, eps: float = 1e-3,
                      rho: float = 7.0, lower_order_final: bool = True,
                      thresholding: str = "none", threshold_percentile: float = 0.995,
                      data_range: tuple[float, float] | None = None):
    """UniPC-`order` with B(h) `variant` over `num_steps` steps of `schedule`: UniP predictor,
    UniC corrector after every step but the last (see `unipc_coefficients`).

    Returns `sampler(rng, score_fn, z=None) -> (samples shaped `shape`, nfe)`; nfe =
    num_steps + denoise (the corrector reuses the next step's score evaluation).
    """
    t = time_grid(sde, num_steps, eps, schedule, rho)
    alpha, sigma, lam = _coefficients(sde, t)
    a, P, C = unipc_coefficients(alpha, sigma, lam, order, variant, lower_order_final)
    # Correct, then predict: x_{i+1} = a_i (x~_i + sum_k C_ik m_{i-k}) + sum_k P_ik m_{i-k}.
    c = a[:, None] * C
    c[:, :order] += P
    return _multistep_sampler(sde, shape, inverse_scaler, t, a, c, np.zeros_like(a), denoise,
                              x0_fn=x0_thresholder(thresholding, threshold_percentile, data_range,
                                                   inverse_scaler))


# Adams-Bashforth's weights for equal steps, newest first (iPNDM's).
_ADAMS_BASHFORTH = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12),
                    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def ipndm_coefficients(levels, order: int, variable_steps: bool = False):
    """iPNDM's weights: y_{i+1} = y_i + sum_k w_ik eps_{i-k} on the probability-flow ODE
    dy/ds = eps_hat in y = x / alpha and s = sigma / alpha (Zhang & Chen 2023, DEIS, the
    improved PNDM: linear multistep with lower-order multistep warm-up steps instead of
    PNDM's Runge-Kutta ones; the form of Karras et al. 2022 and github zju-pi/diff-sampler).

    The fixed weights are Adams-Bashforth's for equal steps, w_ik = (s_{i+1} - s_i) AB_k, as
    the published iPNDM uses them on any grid. `variable_steps` integrates the polynomial
    through the last `order` points (s_{i-k}, eps_{i-k}) exactly over [s_i, s_{i+1}] (the
    variable-step Adams-Bashforth, diff-sampler's 'ipndm_v'); both agree on equal steps.
    levels: s [M + 1] decreasing. Returns w [M, order].
    """
    _check_order("ipndm", order)
    levels = np.asarray(levels, np.float64)
    M = len(levels) - 1
    w = np.zeros((M, order))
    nodes01, weights01 = np.polynomial.legendre.leggauss(4)  # exact up to degree 7
    nodes01, weights01 = (nodes01 + 1) / 2, weights01 / 2
    for i in range(M):
        k = min(order, i + 1)
        ds = levels[i + 1] - levels[i]
        if not variable_steps:
            w[i, :k] = ds * np.array(_ADAMS_BASHFORTH[k])
            continue
        u = (levels[i - np.arange(k)] - levels[i]) / ds  # the points, in steps from s_i
        for j in range(k):
            others = np.delete(u, j)
            basis = np.prod((nodes01[:, None] - others) / (u[j] - others), axis=1)
            w[i, j] = ds * np.dot(weights01, basis)
    return w


def get_ipndm_sampler(sde: sde_lib.SDE, shape: Sequence[int], inverse_scaler: Callable,
                      num_steps: int, order: int = 4, schedule: str = "karras",
                      rho: float = 7.0, denoise: bool = False, eps: float = 1e-3,
                      variable_steps: bool = False,
                      thresholding: str = "none", threshold_percentile: float = 0.995,
                      data_range: tuple[float, float] | None = None):
    """iPNDM of `order` (1-4) over `num_steps` steps of `schedule` (EDM's rho schedule by
    default): one score evaluation per step, the noise predictions of the last steps reused
    (see `ipndm_coefficients`). Returns `sampler(rng, score_fn, z=None) -> (samples shaped
    `shape`, nfe)` with nfe = num_steps + denoise.
    """
    t = time_grid(sde, num_steps, eps, schedule, rho)
    alpha, sigma, lam = _coefficients(sde, t)
    w = ipndm_coefficients(np.exp(-lam), order, variable_steps)
    # In x = alpha y: x_{i+1} = (alpha_{i+1} / alpha_i) x_i + alpha_{i+1} sum_k w_ik eps_{i-k}.
    return _multistep_sampler(sde, shape, inverse_scaler, t, alpha[1:] / alpha[:-1],
                              alpha[1:, None] * w, np.zeros(len(w)), denoise, history="noise",
                              x0_fn=x0_thresholder(thresholding, threshold_percentile, data_range,
                                                   inverse_scaler))


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
                     s_tmin: float = 0.0, s_tmax: float = math.inf, s_noise: float = 1.0,
                     thresholding: str = "none", threshold_percentile: float = 0.995,
                     data_range: tuple[float, float] | None = None):
    """EDM's Heun sampler (Karras et al. 2022, Algorithm 1; Algorithm 2 with churn > 0).

    Integrates the probability-flow ODE in the rescaled variable y = x / alpha, whose noise
    level is s = sigma / alpha: dy/ds = (y - x0_hat) / s, over `num_steps` steps of `schedule`
    (EDM's rho schedule by default). Returns `sampler(rng, score_fn, z=None) -> (samples
    shaped `shape`, nfe)` with nfe = 2 num_steps + denoise.
    """
    shape = tuple(int(s) for s in shape)
    x0_fn = x0_thresholder(thresholding, threshold_percentile, data_range, inverse_scaler)
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
            d0 = (y - _data_prediction(score_fn, a0 * y, t0, a0, s0, x0_fn)) / l0
            y_euler = y + (l1 - l0) * d0
            # ... corrected by the trapezoidal rule (Alg. 1, l. 7-8).
            d1 = (y_euler - _data_prediction(score_fn, a1 * y_euler, t1, a1, s1, x0_fn)) / l1
            return y + (l1 - l0) * 0.5 * (d0 + d1), None

        y, _ = jax.lax.scan(step, y, (jnp.arange(len(t) - 1), tables))
        return alpha[-1] * y  # back to x at eps

    def finish(x, score_fn):
        return _data_prediction(score_fn, x, t[-1], alpha[-1], sigma[-1],
                                x0_fn) if denoise else x

    compiled = _compile(shape, lambda x: x / alpha[0], loop, finish, sde, inverse_scaler,
                        stochastic)
    nfe = 2 * (len(t) - 1) + int(denoise)

    def sampler(rng, score_fn: ScoreFn, z=None):
        return compiled(rng, score_fn, z), nfe

    return sampler


# The few-step samplers by `config.sampling.method`.
BUILDERS = {"ddim": get_ddim_sampler, "dpm_solver": get_dpm_solver_sampler,
            "heun": get_heun_sampler, "sde_dpm_solver": get_sde_dpm_solver_sampler,
            "unipc": get_unipc_sampler, "ipndm": get_ipndm_sampler}
# Builder arguments read from a config.sampling key of another name.
_CONFIG_KEYS = {"denoise": "noise_removal", "variant": "unipc_variant",
                "variable_steps": "ipndm_variable_steps"}
# Builder arguments the factory supplies itself (not from config.sampling).
_NOT_FROM_CONFIG = ("sde", "shape", "inverse_scaler", "eps", "data_range")


def sampler_kwargs(config, method: str) -> dict:
    """The keyword arguments of `BUILDERS[method]` read from `config.sampling` by name.

    Each argument is read from config.sampling.<argument> (`_CONFIG_KEYS` for the renamed
    ones: denoise <- noise_removal, variant <- unipc_variant, variable_steps <-
    ipndm_variable_steps); a key the config lacks (a config in the reference's format, an
    older workdir's config.json) takes the project's default (`configs.project_defaults`),
    so the default config is the one place of these defaults; an argument without a config
    key keeps the builder's own default. schedule 'default' becomes the method's
    `DEFAULT_SCHEDULES` entry.
    """
    builder = BUILDERS[method]
    cfg, defaults, kwargs = config.sampling, None, {}
    for name in inspect.signature(builder).parameters:
        if name in _NOT_FROM_CONFIG:
            continue
        key = _CONFIG_KEYS.get(name, name)
        if key in cfg:
            kwargs[name] = cfg[key]
            continue
        if defaults is None:
            import configs  # only here: configs' defaults need nothing of the samplers

            defaults = configs.project_defaults().sampling
        if key in defaults:
            kwargs[name] = defaults[key]
    if kwargs.get("schedule") in ("default", "", None):
        kwargs["schedule"] = DEFAULT_SCHEDULES[method]
    return kwargs


def _register_builtin(method: str) -> None:
    @sampling.register_sampler(name=method)
    def factory(config, sde, shape, inverse_scaler, eps):
        return BUILDERS[method](sde, shape, inverse_scaler, eps=eps,
                                **sampler_kwargs(config, method))

    factory.__name__ = factory.__qualname__ = f"{method}_from_config"


for _method in BUILDERS:
    _register_builtin(_method)
