"""Few-step samplers (DDIM, DPM-Solver++, EDM Heun) against exact answers.

Deterministic samplers are compared with the exact probability-flow ODE map of Gaussian data
N(mu, diag(s^2)): along the ODE the standardized value (x - alpha mu) / sqrt(alpha^2 s^2 +
sigma^2) is constant (the flow of a Gaussian is affine and preserves each marginal's quantiles),
so the sample at eps that a latent x_T maps to is known in closed form. The order runs use
float64 (`jax.enable_x64`) so that the log-log slopes are not cut off by float32 rounding.
Stochastic variants must reproduce the 4-D mixture data of test_sampling.py.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from gaussian_utils import GaussianMixture
from test_sampling import DATA, IDENTITY, SDES, SHAPE, BrownianSDE, _loops, assert_matches_data

import fast_samplers
import sampling
import sde_lib

MU = np.array([0.5, -1.0, 0.2, 1.5])
S = np.array([0.5, 1.0, 0.2, 2.0])
GAUSSIAN = GaussianMixture.gaussian(MU, S)
BATCH = 8


def gaussian_map(sde, z, t):
    """Where the probability-flow ODE carries standardized value z [B, D] at time t (float64)."""
    alpha, sigma = (float(v) for v in sde.marginal_coefficients(jnp.asarray(t)))
    return alpha * MU + np.sqrt(alpha**2 * S**2 + sigma**2) * z


def make(kind, sde, num_steps, shape=(BATCH, 4), **kwargs):
    eps = sde.sampling_eps
    if kind == "ddim":
        return fast_samplers.get_ddim_sampler(sde, shape, IDENTITY, num_steps, eps=eps, **kwargs)
    if kind == "heun":
        return fast_samplers.get_heun_sampler(sde, shape, IDENTITY, num_steps, eps=eps, **kwargs)
    order = int(kind.split("_")[1][0])  # 'dpm_2m' -> 2
    return fast_samplers.get_dpm_solver_sampler(sde, shape, IDENTITY, num_steps, order=order,
                                                eps=eps, **kwargs)


# Theoretical order and step counts in the asymptotic range (smaller counts are dominated by
# higher-order terms; DPM-Solver++(2M)'s extrapolation needs more steps to settle).
ORDERS = {"ddim": (1, (32, 64, 128)), "dpm_2m": (2, (64, 128, 256)),
          "dpm_3m": (3, (12, 18, 27)), "heun": (2, (16, 32, 64))}
FINEST_ERROR = {"ddim": 0.2, "dpm_2m": 1e-3, "dpm_3m": 2e-2, "heun": 3e-2}


@pytest.mark.parametrize("kind", sorted(ORDERS))
@pytest.mark.parametrize("name", sorted(SDES))
def test_converges_to_the_ode_solution_at_its_order(name, kind):
    order, steps = ORDERS[kind]
    sde = SDES[name]()
    z = np.asarray(jax.random.normal(jax.random.key(0), (BATCH, 4)), np.float64)
    with jax.enable_x64(True):
        score_fn = GAUSSIAN.score_fn(sde)
        x_T, target = gaussian_map(sde, z, sde.T), gaussian_map(sde, z, sde.sampling_eps)
        errors = []
        for n in steps:
            x, nfe = make(kind, sde, n)(None, score_fn, jnp.asarray(x_T))
            assert nfe == (2 * n if kind == "heun" else n)
            errors.append(np.max(np.abs(np.asarray(x) - target) / S))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    # DPM-Solver++(3M) starts with one first- and one second-order step (it has no history
    # yet); their error fades fast here but leaves the fitted slope above 3 (see docs).
    low, high = (2.5, 4.5) if kind == "dpm_3m" else (order - 0.3, order + 0.3)
    assert low <= slope <= high, f"{kind} on {name}: slope {slope:.2f}, errors {errors}"
    # ... towards the exact solution: the largest error at the finest grid, in data stds.
    assert errors[-1] < FINEST_ERROR[kind], errors


def _polynomial_integral(coef, lo, hi):
    """Exact integral of e^l p(l) over [lo, hi] for a polynomial p (numpy coefficients, low
    order first): an antiderivative is e^l (p - p' + p'' - ...)."""
    p = np.polynomial.Polynomial(coef)
    antiderivative = sum(((-1) ** k) * p.deriv(k) for k in range(len(coef)))
    return np.exp(hi) * antiderivative(hi) - np.exp(lo) * antiderivative(lo)


@pytest.mark.parametrize("order", [1, 3])
def test_dpm_solver_steps_are_exact_for_polynomial_data_predictions(order):
    # DPM-Solver++ integrates x_t / sigma_t = x_s / sigma_s + int e^lambda x0(lambda) d lambda
    # (Lu et al. 2022, Eq. 8); its k-th order update is exact when x0 is a polynomial of
    # degree k - 1 in lambda, once k past predictions exist. (2M extrapolates with a
    # simplified coefficient and is exact only for constant x0.)
    lam = np.array([-3.0, -2.1, -1.5, -0.2, 0.4, 1.9, 2.5])
    alpha = 1.0 / np.sqrt(1.0 + np.exp(-2.0 * lam))  # a VP-type marginal
    sigma = alpha * np.exp(-lam)
    poly = [0.7, -0.4, 0.3][:order]
    a, c = fast_samplers.dpm_solver_coefficients(alpha, sigma, lam, order,
                                                 lower_order_final=False)
    x0 = np.polynomial.Polynomial(poly)(lam)
    for i in range(order - 1, len(lam) - 1):
        x = 0.37  # any state: the update is exact for every x
        step = a[i] * x + sum(c[i, k] * x0[i - k] for k in range(order))
        exact = sigma[i + 1] * (x / sigma[i] + _polynomial_integral(poly, lam[i], lam[i + 1]))
        np.testing.assert_allclose(step, exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SDES))
def test_ddim_is_first_order_dpm_solver(name):
    sde = SDES[name]()
    z = jax.random.normal(jax.random.key(1), (BATCH, 4))
    score_fn = GAUSSIAN.score_fn(sde)
    ddim, _ = make("ddim", sde, 15, schedule="logsnr")(None, score_fn, z)
    dpm1, _ = make("dpm_1", sde, 15)(None, score_fn, z)
    np.testing.assert_allclose(ddim, dpm1, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(SDES))
def test_stochastic_variants_reproduce_the_data(name):
    sde = SDES[name]()
    score_fn = DATA.score_fn(sde)
    ddim = make("ddim", sde, 250, SHAPE, eta=1.0)
    x, nfe = ddim(jax.random.key(2), score_fn)
    assert nfe == 250
    assert_matches_data(x, 0.01)
    heun = make("heun", sde, 100, SHAPE, churn=30.0)
    x, nfe = heun(jax.random.key(3), score_fn)
    assert nfe == 200
    assert_matches_data(x, 0.01)


def test_deterministic_samplers_reproduce_the_data_from_the_prior():
    sde = SDES["vp"]()
    score_fn = DATA.score_fn(sde)
    for kind in ("dpm_3m", "heun"):
        assert_matches_data(make(kind, sde, 25, SHAPE)(jax.random.key(4), score_fn)[0], 0.01)


def test_new_sde_with_a_gaussian_marginal_works_unchanged():
    # BrownianSDE defines only sde / marginal_prob / prior: the samplers read alpha = 1,
    # sigma = 5 sqrt(t) through the defaults, and place their times by bisection.
    sde = BrownianSDE(sigma=5.0, N=100)
    assert type(sde).t_from_half_log_snr is sde_lib.SDE.t_from_half_log_snr
    t = jnp.array([1e-4, 0.01, 0.3, 1.0])
    np.testing.assert_allclose(sde.t_from_half_log_snr(sde.half_log_snr(t)), t, rtol=1e-4)
    z = np.asarray(jax.random.normal(jax.random.key(5), (BATCH, 4)), np.float64)
    score_fn = GAUSSIAN.score_fn(sde)
    x_T, target = gaussian_map(sde, z, sde.T), gaussian_map(sde, z, sde.sampling_eps)
    for kind in ("ddim", "dpm_2m", "dpm_3m", "heun"):
        # (time-uniform steps, DDIM's default, are far too coarse near t = 0 for sigma ~ sqrt t)
        kwargs = {"schedule": "logsnr"} if kind == "ddim" else {}
        x, _ = make(kind, sde, 40, **kwargs)(None, score_fn, jnp.asarray(x_T, jnp.float32))
        error = np.max(np.abs(np.asarray(x, np.float64) - target) / S)
        assert error < (0.25 if kind == "ddim" else 1e-2), (kind, error)


@pytest.mark.parametrize("name", sorted(SDES))
@pytest.mark.parametrize("schedule", fast_samplers.SCHEDULES)
def test_time_grids(name, schedule):
    sde = SDES[name]()
    eps = sde.sampling_eps
    t = fast_samplers.time_grid(sde, 12, eps, schedule, rho=7.0)
    assert t.shape == (13,) and t[0] == sde.T and t[-1] == np.float32(eps)
    assert np.all(np.diff(t) < 0)
    lam = np.asarray(sde.half_log_snr(jnp.asarray(t, jnp.float32)), np.float64)
    # Each schedule is uniform in its own variable.
    uniform = {"logsnr": lam, "time_uniform": t, "time_quadratic": np.sqrt(t),
               "karras": np.exp(-lam / 7.0)}[schedule]
    steps = np.diff(uniform)
    np.testing.assert_allclose(steps, steps.mean(), rtol=2e-3, atol=2e-5)


def test_heun_churn_schedule():
    levels = np.array([80.0, 20.0, 5.0, 1.0, 0.1, 0.01])
    gamma = fast_samplers.heun_churn(levels, churn=1.0, s_tmin=0.05, s_tmax=50.0)
    # min(S_churn / M, sqrt 2 - 1) inside [S_tmin, S_tmax], 0 outside (EDM Algorithm 2).
    np.testing.assert_allclose(gamma, [0.0, 0.2, 0.2, 0.2, 0.2])
    gamma = fast_samplers.heun_churn(levels, churn=100.0)
    assert gamma[1:].max() == pytest.approx(np.sqrt(2) - 1) and gamma[0] == 0.0


def _counting(score_fn, calls):
    def counted(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return score_fn(x, t)

    return counted


@pytest.mark.parametrize("kind", ["ddim", "dpm_3m", "heun"])
def test_nfe_is_the_true_count_and_one_program(kind):
    sde = SDES["vp"]()
    traces, calls = [], []
    base = GAUSSIAN.score_fn(sde)

    def score_fn(x, t):
        traces.append(1)  # runs only while tracing
        return _counting(base, calls)(x, t)

    for denoise in (False, True):
        traces.clear()
        sampler = make(kind, sde, 7, denoise=denoise)
        calls.clear()
        x, nfe = sampler(jax.random.key(0), score_fn)
        jax.effects_barrier()
        assert nfe == len(calls) == (14 if kind == "heun" else 7) + denoise
        # The loop body's score calls are traced once, not once per step.
        assert len(traces) == (2 if kind == "heun" else 1) + denoise
        sampler(jax.random.key(1), score_fn)
        assert len(traces) == (2 if kind == "heun" else 1) + denoise, "retraced"
    jaxpr = jax.make_jaxpr(lambda rng: sampler(rng, base)[0])(jax.random.key(0))
    assert len(_loops(jaxpr.jaxpr)) == 1


def test_sampler_under_outer_jit_with_traced_parameters():
    sde = SDES["ve"]()
    make_score_fn = lambda scale: (lambda x, t: -scale * x / (1.0 + sde.sigma(t)[:, None] ** 2))
    sampler = make("dpm_2m", sde, 10, (16, 3))
    jitted = jax.jit(lambda rng, scale: sampler(rng, make_score_fn(scale))[0])
    a = jitted(jax.random.key(0), 1.0)
    b = jitted(jax.random.key(0), 3.0)
    assert jitted._cache_size() == 1
    np.testing.assert_allclose(a, sampler(jax.random.key(0), make_score_fn(1.0))[0], rtol=1e-5,
                               atol=1e-5)
    assert not np.allclose(a, b)


def _config(method, **sampling_keys):
    keys = {"method": method, "noise_removal": False, **sampling_keys}
    return ml_collections.ConfigDict({"sampling": keys})


@pytest.mark.parametrize("method,keys,factory,kwargs", [
    ("ddim", {"num_steps": 12, "eta": 0.0, "schedule": "default"}, "ddim",
     {"num_steps": 12, "schedule": "time_uniform"}),
    ("ddim", {"num_steps": 12, "eta": 0.5, "schedule": "logsnr", "noise_removal": True}, "ddim",
     {"num_steps": 12, "eta": 0.5, "schedule": "logsnr", "denoise": True}),
    ("dpm_solver", {"num_steps": 9, "order": 3, "schedule": "time_quadratic"}, "dpm_solver",
     {"num_steps": 9, "order": 3, "schedule": "time_quadratic"}),
    ("heun", {"num_steps": 6, "churn": 5.0, "schedule": "default", "rho": 5.0}, "heun",
     {"num_steps": 6, "churn": 5.0, "schedule": "karras", "rho": 5.0}),
])
def test_get_sampling_fn_builds_the_few_step_samplers(method, keys, factory, kwargs):
    sde = SDES["subvp"]()
    sampler = sampling.get_sampling_fn(_config(method, **keys), sde, (64, 4), IDENTITY, 1e-3)
    direct = {"ddim": fast_samplers.get_ddim_sampler,
              "dpm_solver": fast_samplers.get_dpm_solver_sampler,
              "heun": fast_samplers.get_heun_sampler}[factory](sde, (64, 4), IDENTITY,
                                                              eps=1e-3, **kwargs)
    score_fn = GAUSSIAN.score_fn(sde)
    x, nfe = sampler(jax.random.key(0), score_fn)
    expected, expected_nfe = direct(jax.random.key(0), score_fn)
    assert nfe == expected_nfe == kwargs["num_steps"] * (2 if method == "heun" else 1) + (
        kwargs.get("denoise", False))
    np.testing.assert_array_equal(x, expected)
    assert np.all(np.isfinite(np.asarray(x)))


def test_a_registered_few_step_sampler_runs_through_get_sampling_fn():
    @sampling.register_sampler(name="test_only_euler")
    def euler(config, sde, shape, inverse_scaler, eps):
        """Plain Euler on the probability-flow ODE over a logSNR grid, in one fori_loop."""
        t = jnp.asarray(fast_samplers.time_grid(sde, config.sampling.num_steps, eps, "logsnr"),
                        jnp.float32)

        @functools.partial(jax.jit, static_argnums=1)
        def sample(rng, score_fn):
            ode = sde.reverse(score_fn, probability_flow=True)

            def step(i, x):
                drift = ode.sde(x, jnp.full((shape[0],), t[i]))[0]
                return x + drift * (t[i + 1] - t[i])

            x = jax.lax.fori_loop(0, len(t) - 1, step, sde.prior_sampling(rng, shape))
            return inverse_scaler(x)

        return lambda rng, score_fn: (sample(rng, score_fn), len(t) - 1)

    try:
        sde = SDES["vp"]()
        config = _config("test_only_euler", num_steps=200)
        x, nfe = sampling.get_sampling_fn(config, sde, (4000, 4), IDENTITY, 1e-3)(
            jax.random.key(6), GAUSSIAN.score_fn(sde))
        assert nfe == 200
        x = np.asarray(x, np.float64)
        np.testing.assert_array_less(np.abs(x.mean(0) - MU), 4 * S / np.sqrt(4000) + 0.03 * S)
        np.testing.assert_array_less(np.abs(x.std(0) - S), 4 * S / np.sqrt(8000) + 0.03 * S)
    finally:
        sampling._SAMPLERS.pop("test_only_euler")


def test_bad_settings_name_the_value_and_the_choices():
    sde = SDES["vp"]()
    with pytest.raises(ValueError, match=r"order must be 1, 2 or 3, got 4"):
        make("dpm_4", sde, 10)
    with pytest.raises(ValueError, match=r"'cosine'.*logsnr.*karras"):
        make("ddim", sde, 10, schedule="cosine")
    with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\], got 1.5"):
        make("ddim", sde, 10, eta=1.5)
    with pytest.raises(ValueError, match=r"num_steps must be an integer >= 1, got 0"):
        make("heun", sde, 0)
    with pytest.raises(ValueError, match=r"churn must be >= 0, got -1"):
        make("heun", sde, 10, churn=-1.0)
    with pytest.raises(ValueError, match=r"valid names.*'ddim'.*'dpm_solver'.*'heun'"):
        sampling.get_sampler("dpm_solver_pp")
