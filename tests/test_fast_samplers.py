"""Few-step samplers (DDIM, DPM-Solver++, EDM Heun, UniPC, iPNDM, SDE-DPM-Solver++) against
exact answers.

Deterministic samplers are compared with the exact probability-flow ODE map of Gaussian data
N(mu, diag(s^2)): along the ODE the standardized value (x - alpha mu) / sqrt(alpha^2 s^2 +
sigma^2) is constant (the flow of a Gaussian is affine and preserves each marginal's quantiles),
so the sample at eps that a latent x_T maps to is known in closed form. The order runs use
float64 (`jax.enable_x64`) so that the log-log slopes are not cut off by float32 rounding.
Stochastic variants must reproduce the 4-D mixture data of test_sampling.py.
"""

import functools
import math

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
    if kind.startswith("unipc"):  # 'unipc_bh2_3': B(h) variant, order
        _, variant, order = kind.split("_")
        return fast_samplers.get_unipc_sampler(sde, shape, IDENTITY, num_steps, order=int(order),
                                               variant=variant, eps=eps, **kwargs)
    if kind.startswith("ipndm"):  # 'ipndm_4': iPNDM's weights; 'ipndm_v_4': variable steps
        return fast_samplers.get_ipndm_sampler(sde, shape, IDENTITY, num_steps,
                                               order=int(kind[-1]), eps=eps,
                                               variable_steps="_v_" in kind, **kwargs)
    if kind.startswith("sde_dpm"):  # 'sde_dpm_2m'
        return fast_samplers.get_sde_dpm_solver_sampler(sde, shape, IDENTITY, num_steps,
                                                        order=int(kind[-2]), eps=eps, **kwargs)
    order = int(kind.split("_")[1][0])  # 'dpm_2m' -> 2
    return fast_samplers.get_dpm_solver_sampler(sde, shape, IDENTITY, num_steps, order=order,
                                                eps=eps, **kwargs)


# Theoretical order and step counts in the asymptotic range (smaller counts are dominated by
# higher-order terms; DPM-Solver++(2M)'s extrapolation needs more steps to settle).
# UniPC-p with its corrector has order p + 1 (Zhao et al. 2023, Thm. 3.1); its warm-up steps
# (orders 1, 2) settle later. iPNDM with variable-step weights ('ipndm_v_k') has order k; with
# the published fixed weights ('ipndm_4'), made for equal steps, it has order 2 on a grid whose
# steps vary smoothly (here EDM's): each step's weights are off by O(step change) = O(h^2).
ORDERS = {"ddim": (1, (32, 64, 128)), "dpm_2m": (2, (64, 128, 256)),
          "dpm_3m": (3, (12, 18, 27)), "heun": (2, (16, 32, 64)),
          "unipc_bh2_1": (2, (32, 64, 128)), "unipc_bh2_2": (3, (40, 60, 90)),
          "unipc_bh2_3": (4, (135, 200, 300)), "unipc_bh1_1": (2, (32, 64, 128)),
          "unipc_bh1_2": (3, (40, 60, 90)), "ipndm_v_2": (2, (135, 200, 300)),
          "ipndm_v_3": (3, (135, 200, 300)), "ipndm_v_4": (4, (135, 200, 300)),
          "ipndm_4": (2, (60, 90, 135))}
FINEST_ERROR = {"ddim": 0.2, "dpm_2m": 1e-3, "dpm_3m": 2e-2, "heun": 3e-2,
                "unipc_bh2_1": 3e-2, "unipc_bh2_2": 3e-3, "unipc_bh2_3": 3e-6,
                "unipc_bh1_1": 1e-2, "unipc_bh1_2": 1e-3, "ipndm_v_2": 3e-3,
                "ipndm_v_3": 3e-4, "ipndm_v_4": 3e-5, "ipndm_4": 3e-3}
# The new samplers' variants on all three SDEs, the rest on one (the code is shared).
ORDER_CASES = [(name, kind) for kind in sorted(ORDERS) for name in sorted(SDES)
               if kind in ("ddim", "dpm_2m", "dpm_3m", "heun", "unipc_bh2_1", "unipc_bh2_2",
                           "unipc_bh2_3", "ipndm_v_2", "ipndm_v_4")
               or (name, kind) in {("vp", "unipc_bh1_1"), ("ve", "unipc_bh1_2"),
                                   ("subvp", "ipndm_v_3"), ("vp", "ipndm_4"),
                                   ("ve", "ipndm_4")}]


@pytest.mark.parametrize("name,kind", ORDER_CASES)
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


def _vp_grid(lam):
    """alpha, sigma of a VP-type marginal at half log-SNRs lam."""
    alpha = 1.0 / np.sqrt(1.0 + np.exp(-2.0 * lam))
    return alpha, alpha * np.exp(-lam)


def _orders_used(c):
    """How many past predictions each step's update uses (nonzero coefficients)."""
    return list(np.sum(np.abs(c) > 0, axis=1))


@pytest.mark.parametrize("M", [4, 6, 9, 10, 12])
def test_lower_order_final_steps_below_ten_steps(M):
    # LuChengTHU/dpm-solver (`lower_order_final`, steps < 10): the last step is of order 1 and
    # the one before of order at most 2; with 10 steps or more every step after the warm-up
    # keeps the full order. The same rule holds for SDE-DPM-Solver++ and UniPC.
    lam = np.linspace(-4.0, 3.0, M + 1)
    alpha, sigma = _vp_grid(lam)
    short = M < fast_samplers.LOWER_ORDER_FINAL_BELOW
    for order in (2, 3):
        a, c = fast_samplers.dpm_solver_coefficients(alpha, sigma, lam, order)
        _, full = fast_samplers.dpm_solver_coefficients(alpha, sigma, lam, order,
                                                        lower_order_final=False)
        expected = [min(order, i + 1, M - i) if short else min(order, i + 1) for i in range(M)]
        assert _orders_used(c) == expected
        assert _orders_used(full) == [min(order, i + 1) for i in range(M)]
        if short:
            h = lam[-1] - lam[-2]  # the last step is DDIM's (DPM-Solver++ 1)
            np.testing.assert_allclose(c[-1, 0], -alpha[-1] * np.expm1(-h), rtol=1e-12)
            if order == 3 and M >= 3:  # ... and the one before DPM-Solver++(2M)'s
                _, two = fast_samplers.dpm_solver_coefficients(alpha, sigma, lam, 2,
                                                               lower_order_final=False)
                np.testing.assert_allclose(c[-2, :2], two[-2], rtol=1e-12)
        else:
            np.testing.assert_array_equal(c, full)
    _, c, _ = fast_samplers.sde_dpm_solver_coefficients(alpha, sigma, lam, 2)
    assert _orders_used(c) == [min(2, i + 1, M - i) if short else min(2, i + 1)
                               for i in range(M)]
    _, P, _ = fast_samplers.unipc_coefficients(alpha, sigma, lam, 3)
    assert _orders_used(P) == [min(3, i + 1, M - i) if short else min(3, i + 1)
                               for i in range(M)]


def _unipc_reference(sde, score_fn, x, t, order, variant):
    """UniPC step by step as Zhao et al. 2023 write it (Alg. 2-3, data prediction): predict
    with UniP, evaluate the model at the prediction, correct with UniC, keep that evaluation."""
    alpha, sigma, lam = (np.asarray(v) for v in fast_samplers._coefficients(sde, t))
    M = len(t) - 1

    def model(x, i):
        score = np.asarray(score_fn(jnp.asarray(x), jnp.full((x.shape[0],), t[i])))
        return (x + sigma[i] ** 2 * score) / alpha[i]

    past = [model(x, 0)]
    for i in range(M):
        p = min(order, i + 1, M - i) if M < 10 else min(order, i + 1)
        h = lam[i + 1] - lam[i]
        r = np.array([(lam[i - k] - lam[i]) / h for k in range(1, p)] + [1.0])
        D = [(past[-1 - k] - past[-1]) / r[k - 1] for k in range(1, p)]
        B = -h if variant == "bh1" else np.expm1(-h)
        # b_j = j! (-h) phi_{j+1}(-h) / B(h), j = 1..p, phi_k(z) = sum_n z^n / (n + k)!
        phi = lambda k: sum((-h) ** n / math.factorial(n + k) for n in range(40))  # noqa: B023
        b = np.array([math.factorial(j) * (-h) * phi(j + 1) / B for j in range(1, p + 1)])
        R = np.array([r ** j for j in range(p)])
        x_ = sigma[i + 1] / sigma[i] * x - alpha[i + 1] * np.expm1(-h) * past[-1]
        rho_p = [0.5] if p == 2 else (np.linalg.solve(R[:-1, :-1], b[:-1]) if p > 2 else [])
        x_pred = x_ - alpha[i + 1] * B * sum((rho_p[k] * D[k] for k in range(p - 1)), 0.0)
        if i == M - 1:
            return x_pred
        m_new = model(x_pred, i + 1)
        rho_c = [0.5] if p == 1 else np.linalg.solve(R, b)
        x = x_ - alpha[i + 1] * B * (sum((rho_c[k] * D[k] for k in range(p - 1)), 0.0)
                                     + rho_c[-1] * (m_new - past[-1]))
        past.append(m_new)


@pytest.mark.parametrize("variant", fast_samplers.UNIPC_VARIANTS)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_is_its_step_by_step_algorithm(order, variant):
    # The sampler folds each corrector into the next step's update (one loop, one score
    # evaluation per step); the result must be the paper's predict-evaluate-correct loop.
    sde = SDES["vp"]()
    z = np.asarray(jax.random.normal(jax.random.key(7), (BATCH, 4)), np.float64)
    with jax.enable_x64(True):
        score_fn = GAUSSIAN.score_fn(sde)
        x_T = gaussian_map(sde, z, sde.T)
        M = 6  # orders 1, 2, 3, 3, 2, 1 for UniPC-3: warm-up, full order, lower-order final
        t = fast_samplers.time_grid(sde, M, sde.sampling_eps, "logsnr")
        x, nfe = make(f"unipc_{variant}_{order}", sde, M)(None, score_fn, jnp.asarray(x_T))
        assert nfe == M
        expected = _unipc_reference(sde, score_fn, x_T, t, order, variant)
        np.testing.assert_allclose(np.asarray(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", fast_samplers.UNIPC_VARIANTS)
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_updates_are_exact_for_polynomial_data_predictions(order, variant):
    # UniP-p and UniC-p solve for weights that integrate the first Taylor terms of x0(lambda)
    # exactly (Zhao et al. 2023, Eq. 7-8): the predictor is exact for x0 of degree p - 1 and
    # the corrector, which adds the new point, for degree p. Where a single weight is used
    # (UniP-2, UniC-1) the paper fixes it at 1/2 instead, exact for constant x0 only.
    lam = np.array([-3.0, -2.1, -1.5, -0.2, 0.4, 1.9, 2.5])
    alpha, sigma = _vp_grid(lam)
    a, P, C = fast_samplers.unipc_coefficients(alpha, sigma, lam, order, variant,
                                               lower_order_final=False)
    exact_degree = {"predictor": order - 1 if order != 2 else 0,
                    "corrector": order if order != 1 else 0}
    for part, degree in exact_degree.items():
        for poly in ([0.7], [0.7, -0.4], [0.7, -0.4, 0.3], [0.7, -0.4, 0.3, -0.2]):
            x0 = np.polynomial.Polynomial(poly)(lam)
            errors = []
            for i in range(order - 1, len(lam) - 2):
                x = 0.37
                step = a[i] * x + sum(P[i, k] * x0[i - k] for k in range(order))
                if part == "corrector":
                    step += sum(C[i + 1, k] * x0[i + 1 - k] for k in range(order + 1))
                exact = sigma[i + 1] * (x / sigma[i]
                                        + _polynomial_integral(poly, lam[i], lam[i + 1]))
                errors.append(abs(step - exact))
            if len(poly) - 1 <= degree:
                assert max(errors) < 1e-12, (part, poly, errors)
            else:  # ... and no more
                assert max(errors) > 1e-6, (part, poly, errors)


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


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_weights(order):
    # On equal steps both forms are Adams-Bashforth's (iPNDM's 3/2, -1/2; 23/12, ...; 55/24,
    # -59/24, 37/24, -9/24). On any grid the variable-step weights integrate the polynomial
    # through the last `order` noise predictions exactly: exact for eps(s) of degree order - 1.
    equal = np.linspace(80.0, 0.5, 9)
    fixed = fast_samplers.ipndm_coefficients(equal, order)
    variable = fast_samplers.ipndm_coefficients(equal, order, variable_steps=True)
    np.testing.assert_allclose(variable, fixed, rtol=1e-12, atol=1e-12)
    ab = {1: [1], 2: [3, -1], 3: [23, -16, 5], 4: [55, -59, 37, -9]}[order]
    np.testing.assert_allclose(fixed[-1] / (equal[1] - equal[0]),
                               np.array(ab) / {1: 1, 2: 2, 3: 12, 4: 24}[order], rtol=1e-12)
    levels = np.array([150.0, 61.0, 20.0, 7.5, 2.0, 0.6, 0.1, 0.02])  # EDM-like, uneven
    w = fast_samplers.ipndm_coefficients(levels, order, variable_steps=True)
    w_fixed = fast_samplers.ipndm_coefficients(levels, order)
    for degree in range(order + 1):
        eps = np.polynomial.Polynomial(np.arange(1.0, degree + 2.0) / 10)
        for i in range(order - 1, len(levels) - 1):
            step = sum(w[i, k] * eps(levels[i - k]) for k in range(order))
            exact = eps.integ()(levels[i + 1]) - eps.integ()(levels[i])
            if degree < order:
                np.testing.assert_allclose(step, exact, rtol=1e-10)
            else:
                assert abs(step - exact) > 1e-6 * abs(exact)
            if degree == 1 and order > 1:  # the fixed weights are not exact on uneven steps
                fixed_step = sum(w_fixed[i, k] * eps(levels[i - k]) for k in range(order))
                assert abs(fixed_step - exact) > 1e-3 * abs(exact)


@pytest.mark.parametrize("name", sorted(SDES))
def test_ipndm_first_order_is_ddim(name):
    # Euler's method on dy/ds = eps_hat in y = x / alpha, s = sigma / alpha is DDIM (Song et
    # al. 2021, Eq. 14), on the same grid.
    sde = SDES[name]()
    z = jax.random.normal(jax.random.key(8), (BATCH, 4))
    score_fn = GAUSSIAN.score_fn(sde)
    ddim, _ = make("ddim", sde, 15, schedule="karras")(None, score_fn, z)
    ipndm, nfe = make("ipndm_1", sde, 15)(None, score_fn, z)
    assert nfe == 15
    np.testing.assert_allclose(ipndm, ddim, rtol=1e-4, atol=1e-4)


def _sde_dpm_solver_law(sde, num_steps, order, mean, std):
    """The exact law N(m, v) of SDE-DPM-Solver++'s sample at eps, per dimension, for data
    N(mean, std^2) started from the exact marginal at T: the data prediction is affine in x,
    x0_hat = mean + g (x - alpha mean) with g = alpha std^2 / (alpha^2 std^2 + sigma^2), so the
    pair (x_i, x_{i-1}) stays Gaussian and its mean and covariance follow the coefficients."""
    t = fast_samplers.time_grid(sde, num_steps, sde.sampling_eps, "logsnr")
    alpha, sigma, lam = fast_samplers._coefficients(sde, t)
    a, c, noise = fast_samplers.sde_dpm_solver_coefficients(alpha, sigma, lam, order)
    g = alpha * std**2 / (alpha**2 * std**2 + sigma**2)
    m = np.array([alpha[0] * mean, 0.0])
    cov = np.diag([alpha[0] ** 2 * std**2 + sigma[0] ** 2, 0.0])
    for i in range(num_steps):
        A = np.array([[a[i] + c[i, 0] * g[i], 0.0], [1.0, 0.0]])
        shift = c[i, 0] * (1 - g[i] * alpha[i]) * mean
        if order == 2 and i > 0:
            A[0, 1] = c[i, 1] * g[i - 1]
            shift += c[i, 1] * (1 - g[i - 1] * alpha[i - 1]) * mean
        m = A @ m + np.array([shift, 0.0])
        cov = A @ cov @ A.T + np.diag([noise[i] ** 2, 0.0])
    target = (alpha[-1] * mean, np.sqrt(alpha[-1] ** 2 * std**2 + sigma[-1] ** 2))
    return (m[0], np.sqrt(cov[0, 0])), target


@pytest.mark.parametrize("name", sorted(SDES))
def test_sde_dpm_solver_law_on_gaussian_data(name):
    # On Gaussian data the sample's mean is exact at any step count, and on a point mass
    # (std 0) its whole law: the linear part is solved exactly and x0_hat is then the point.
    # The std converges at the solver's order: 1 (DDPM's ancestral step), 2 (2M).
    sde = SDES[name]()
    for order in (1, 2):
        for n in (3, 7):
            (m, s), (target_m, target_s) = _sde_dpm_solver_law(sde, n, order, 0.5, 0.0)
            np.testing.assert_allclose([m, s], [target_m, target_s], rtol=1e-10)
        steps, errors = (40, 80, 160), []
        for n in steps:
            (m, s), (target_m, target_s) = _sde_dpm_solver_law(sde, n, order, 0.5, 0.5)
            np.testing.assert_allclose(m, target_m, rtol=1e-10, atol=1e-12)
            errors.append(abs(s - target_s))
        slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
        assert order - 0.2 <= slope <= order + 0.2, (name, order, slope, errors)


@pytest.mark.parametrize("name", sorted(SDES))
def test_sde_dpm_solver_samples_follow_its_law(name):
    # The sampler's draws at 10 steps against the law its coefficients imply (discretization
    # error included, a few % of the std at 10 steps): 4 standard errors.
    sde = SDES[name]()
    n = 20000
    alpha_T, sigma_T = (float(v) for v in sde.marginal_coefficients(jnp.asarray(sde.T)))
    z = jax.random.normal(jax.random.key(9), (n, 4))
    x_T = alpha_T * MU + np.sqrt(alpha_T**2 * S**2 + sigma_T**2) * np.asarray(z)
    x, nfe = make("sde_dpm_2m", sde, 10, (n, 4))(jax.random.key(10), GAUSSIAN.score_fn(sde),
                                                 jnp.asarray(x_T, jnp.float32))
    assert nfe == 10
    x = np.asarray(x, np.float64)
    for d in range(4):
        (m, s), (_, target_s) = _sde_dpm_solver_law(sde, 10, 2, MU[d], S[d])
        assert abs(x[:, d].mean() - m) < 4 * s / np.sqrt(n), (d, x[:, d].mean(), m)
        assert abs(x[:, d].std() - s) < 4 * s / np.sqrt(2 * n), (d, x[:, d].std(), s)
    # 10 steps are visibly biased in the std for VP (its law is not the target's) ...
    if name == "vp":
        assert abs(s - target_s) > 8 * s / np.sqrt(2 * n)


def test_sde_dpm_solver_reproduces_the_data():
    sde = SDES["vp"]()
    x, nfe = make("sde_dpm_2m", sde, 50, SHAPE)(jax.random.key(11), DATA.score_fn(sde))
    assert nfe == 50
    assert_matches_data(x, 0.01)
    # Its first order is DDIM with eta = 1 (DDPM's ancestral step), noise draws included.
    ddim, _ = make("ddim", sde, 12, (BATCH, 4), eta=1.0, schedule="logsnr")(
        jax.random.key(12), GAUSSIAN.score_fn(sde))
    sde1, _ = make("sde_dpm_1m", sde, 12)(jax.random.key(12), GAUSSIAN.score_fn(sde))
    np.testing.assert_allclose(sde1, ddim, rtol=1e-4, atol=1e-4)


def test_deterministic_samplers_reproduce_the_data_from_the_prior():
    sde = SDES["vp"]()
    score_fn = DATA.score_fn(sde)
    for kind in ("dpm_3m", "heun", "unipc_bh2_3", "ipndm_4"):
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
    for kind in ("ddim", "dpm_2m", "dpm_3m", "heun", "unipc_bh2_3", "ipndm_4"):
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


@pytest.mark.parametrize("kind", ["ddim", "dpm_3m", "heun", "unipc_bh2_3", "ipndm_4",
                                  "sde_dpm_2m"])
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
    ("unipc", {"num_steps": 8, "order": 3, "unipc_variant": "bh1", "schedule": "default"},
     "unipc", {"num_steps": 8, "order": 3, "variant": "bh1", "schedule": "logsnr"}),
    ("ipndm", {"num_steps": 7, "order": 4, "ipndm_variable_steps": True, "rho": 5.0,
               "noise_removal": True}, "ipndm",
     {"num_steps": 7, "order": 4, "variable_steps": True, "rho": 5.0, "denoise": True}),
    ("sde_dpm_solver", {"num_steps": 9, "order": 2, "schedule": "time_uniform"},
     "sde_dpm_solver", {"num_steps": 9, "order": 2, "schedule": "time_uniform"}),
])
def test_get_sampling_fn_builds_the_few_step_samplers(method, keys, factory, kwargs):
    sde = SDES["subvp"]()
    sampler = sampling.get_sampling_fn(_config(method, **keys), sde, (64, 4), IDENTITY, 1e-3)
    direct = {"ddim": fast_samplers.get_ddim_sampler,
              "dpm_solver": fast_samplers.get_dpm_solver_sampler,
              "heun": fast_samplers.get_heun_sampler,
              "unipc": fast_samplers.get_unipc_sampler,
              "ipndm": fast_samplers.get_ipndm_sampler,
              "sde_dpm_solver": fast_samplers.get_sde_dpm_solver_sampler}[factory](
        sde, (64, 4), IDENTITY, eps=1e-3, **kwargs)
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
    with pytest.raises(ValueError, match=r"unipc order must be one of \[1, 2, 3\], got 4"):
        make("unipc_bh2_4", sde, 10)
    with pytest.raises(ValueError, match=r"variant must be one of \['bh1', 'bh2'\], got 'bh3'"):
        make("unipc_bh3_2", sde, 10)
    with pytest.raises(ValueError, match=r"ipndm order must be one of \[1, 2, 3, 4\], got 5"):
        make("ipndm_5", sde, 10)
    with pytest.raises(ValueError, match=r"sde_dpm_solver order must be one of \[1, 2\], got 3"):
        make("sde_dpm_3m", sde, 10)
    for method in ("unipc", "ipndm", "sde_dpm_solver"):
        assert method in sampling._SAMPLERS and method in fast_samplers.DEFAULT_SCHEDULES


# ---------------------------------------------------------------------------------------------
# Thresholding of the data prediction (DPM-Solver++'s clipping, Imagen's dynamic thresholding).

DETERMINISTIC = ("ddim", "dpm_2m", "dpm_3m", "heun", "unipc_bh2_3", "ipndm_4")


def test_x0_thresholder_numerics():
    rng = np.random.default_rng(0)
    x0 = rng.normal(0.0, 1.0, (6, 5, 5, 2)) * np.array([0.3, 0.5, 1.0, 2.0, 4.0, 8.0])[
        :, None, None, None]
    assert fast_samplers.x0_thresholder("none") is None
    clip = fast_samplers.x0_thresholder("clip", data_range=(-1.0, 1.0))
    np.testing.assert_array_equal(clip(jnp.asarray(x0)), np.clip(x0, -1, 1).astype(np.float32))
    # The data range from the project's scalers: centred data [-1, 1], else [0, 1].
    for scaler, (lo, hi) in (((lambda x: (x + 1.0) / 2.0), (-1.0, 1.0)), (IDENTITY, (0.0, 1.0))):
        x0_01 = x0 / 2 + 0.5 * (hi + lo)  # around the range's centre
        got = fast_samplers.x0_thresholder("clip", inverse_scaler=scaler)(jnp.asarray(x0_01))
        np.testing.assert_allclose(got, np.clip(x0_01, lo, hi), rtol=1e-6, atol=1e-6)
    # Dynamic (Saharia et al. 2022): s = max(1, quantile_p |u|) per sample, u / s clipped to 1.
    for p in (0.995, 0.9):
        dyn = fast_samplers.x0_thresholder("dynamic", p, data_range=(0.0, 1.0))
        x = 0.5 + 0.5 * x0
        got = np.asarray(dyn(jnp.asarray(x, jnp.float32)), np.float64)
        u = (x - 0.5) / 0.5
        s = np.maximum(1.0, np.quantile(np.abs(u).reshape(6, -1), p, axis=1))[:, None, None,
                                                                               None]
        np.testing.assert_allclose(got, 0.5 + 0.5 * np.clip(u, -s, s) / s, rtol=1e-5, atol=1e-6)
        assert got.min() >= 0.0 and got.max() <= 1.0
        # A sample inside the range is left alone; one far outside keeps its shape (rescaled).
        np.testing.assert_allclose(got[0], np.clip(x[0], 0, 1), atol=1e-6)
        big = np.abs(u[5]) <= s[5]
        np.testing.assert_allclose(got[5][big], 0.5 + 0.5 * u[5][big] / s[5, 0, 0, 0], rtol=1e-5,
                                   atol=1e-6)
    with pytest.raises(ValueError, match=r"'static'.*\['none', 'clip', 'dynamic'\]"):
        fast_samplers.x0_thresholder("static")
    with pytest.raises(ValueError, match=r"percentile must lie in \(0, 1\], got 99.5"):
        fast_samplers.x0_thresholder("dynamic", 99.5)


@pytest.mark.parametrize("kind", DETERMINISTIC)
def test_thresholding_is_exact_when_inactive(kind):
    # Data well inside the range [0, 1] (IDENTITY's): every data prediction of the exact score
    # stays inside, so 'clip' and 'dynamic' change nothing and the sampler keeps its accuracy.
    mu, s = np.array([0.5, 0.4, 0.6, 0.55]), np.array([0.05, 0.03, 0.04, 0.06])
    data = GaussianMixture.gaussian(mu, s)
    sde = SDES["vp"]()
    z = np.clip(np.asarray(jax.random.normal(jax.random.key(1), (BATCH, 4)), np.float64), -3, 3)
    with jax.enable_x64(True):
        score_fn = data.score_fn(sde)
        alpha, sigma = (float(v) for v in sde.marginal_coefficients(jnp.asarray(sde.T)))
        x_T = jnp.asarray(alpha * mu + np.sqrt(alpha**2 * s**2 + sigma**2) * z)
        plain = np.asarray(make(kind, sde, 12, denoise=True)(None, score_fn, x_T)[0])
        for thresholding in ("clip", "dynamic"):
            x = make(kind, sde, 12, denoise=True, thresholding=thresholding)(None, score_fn,
                                                                             x_T)[0]
            np.testing.assert_allclose(np.asarray(x), plain, rtol=1e-12, atol=1e-12)
    assert np.all((plain > 0.2) & (plain < 0.8))


@pytest.mark.parametrize("kind", DETERMINISTIC)
@pytest.mark.parametrize("name", ["vp", "ve"])
def test_clipping_is_exact_for_data_outside_the_range(kind, name):
    # Data at 3 +- 0.05, range [0, 1]: every data prediction is about 3 and clips to 1. With a
    # constant x0_hat = 1 the probability-flow ODE is solved exactly by all these samplers
    # (x_t = alpha_t + sigma_t (x_T - alpha_T) / sigma_T), so they return exactly that; the
    # final denoising step returns the clipped prediction, 1.
    data = GaussianMixture.gaussian(np.full(4, 3.0), np.full(4, 0.05))
    sde = SDES[name]()
    z = np.asarray(jax.random.normal(jax.random.key(2), (BATCH, 4)), np.float64)
    with jax.enable_x64(True):
        score_fn = data.score_fn(sde)
        (a_T, s_T), (a_e, s_e) = [[float(v) for v in sde.marginal_coefficients(jnp.asarray(t))]
                                  for t in (sde.T, sde.sampling_eps)]
        x_T = a_T * 3.0 + np.sqrt(a_T**2 * 0.05**2 + s_T**2) * z
        x, _ = make(kind, sde, 8, thresholding="clip")(None, score_fn, jnp.asarray(x_T))
        np.testing.assert_allclose(np.asarray(x), a_e + s_e * (x_T - a_T) / s_T, rtol=1e-9,
                                   atol=1e-9)
        x, _ = make(kind, sde, 8, thresholding="clip", denoise=True)(None, score_fn,
                                                                    jnp.asarray(x_T))
        np.testing.assert_allclose(np.asarray(x), 1.0, rtol=1e-12)
        # Without it the same sampler lands near the data, far outside the range.
        x, _ = make(kind, sde, 8, denoise=True)(None, score_fn, jnp.asarray(x_T))
        assert np.all(np.asarray(x) > 2.5)


def test_dynamic_thresholding_keeps_the_stochastic_samplers_in_range():
    data = GaussianMixture.gaussian(np.full(4, 3.0), np.full(4, 0.05))
    sde = SDES["vp"]()
    for kind in ("sde_dpm_2m",):
        x, _ = make(kind, sde, 10, denoise=True, thresholding="dynamic")(
            jax.random.key(3), data.score_fn(sde))
        assert np.all((np.asarray(x) >= 0.0) & (np.asarray(x) <= 1.0))
    x, _ = fast_samplers.get_ddim_sampler(sde, (BATCH, 4), IDENTITY, 10, eta=1.0, denoise=True,
                                          thresholding="dynamic")(jax.random.key(3),
                                                                  data.score_fn(sde))
    assert np.all((np.asarray(x) >= 0.0) & (np.asarray(x) <= 1.0))


# ---------------------------------------------------------------------------------------------
# The config adapter: config.sampling is the one place of the samplers' defaults.


@pytest.mark.parametrize("method", sorted(fast_samplers.BUILDERS))
def test_sampler_kwargs_fill_absent_keys_from_the_project_defaults(method):
    import configs

    defaults = configs.project_defaults()
    with defaults.unlocked():
        defaults.sampling.method = method
    full = fast_samplers.sampler_kwargs(defaults, method)
    # A config in the reference's format (no few-step keys at all) gets the same arguments.
    bare = fast_samplers.sampler_kwargs(_config(method, noise_removal=True), method)
    assert bare == full
    sc = defaults.sampling
    assert full["num_steps"] == sc.num_steps and full["denoise"] == sc.noise_removal
    assert full["thresholding"] == sc.thresholding == "none"
    assert full["schedule"] == fast_samplers.DEFAULT_SCHEDULES[method]
    # Every builder argument with a config key is read from it, renamed ones included.
    renamed = {"variant": "unipc_variant", "variable_steps": "ipndm_variable_steps",
               "denoise": "noise_removal"}
    for arg, value in full.items():
        if arg != "schedule":
            assert sc[renamed.get(arg, arg)] == value, arg
    # Builder-only arguments keep the builder's default.
    assert not {"lower_order_final", "s_tmin", "s_tmax", "s_noise", "eps"} & set(full)


def test_config_thresholding_reaches_the_sampler():
    sde = SDES["vp"]()
    data = GaussianMixture.gaussian(np.full(4, 3.0), np.full(4, 0.05))
    config = _config("dpm_solver", num_steps=6, thresholding="dynamic",
                     threshold_percentile=0.9, noise_removal=True)
    x, _ = sampling.get_sampling_fn(config, sde, (BATCH, 4), IDENTITY, 1e-3)(
        jax.random.key(0), data.score_fn(sde))
    expected, _ = fast_samplers.get_dpm_solver_sampler(
        sde, (BATCH, 4), IDENTITY, 6, denoise=True, thresholding="dynamic",
        threshold_percentile=0.9)(jax.random.key(0), data.score_fn(sde))
    np.testing.assert_array_equal(x, expected)
    assert np.all((np.asarray(x) >= 0) & (np.asarray(x) <= 1))
