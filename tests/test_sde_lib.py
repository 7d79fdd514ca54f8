"""SDE classes against simulation and closed forms (Song et al. 2021, Sec. 3.4, App. B)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.stats

import sampling
import sde_lib
from sde_lib import batch_mul

SDES = {
    "ve": lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=1000),
    "vp": lambda: sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000),
    "subvp": lambda: sde_lib.subVPSDE(beta_min=0.1, beta_max=20.0, N=1000),
}


def _simulate_forward(sde, x0, n_paths, n_steps, rng):
    """Euler-Maruyama paths of the forward SDE from a fixed x0 [D]; returns x(T/2), x(T)."""
    dt = sde.T / n_steps
    x = jnp.broadcast_to(jnp.asarray(x0, jnp.float32), (n_paths, len(x0)))

    def step(x, inputs):
        i, key = inputs
        t = jnp.full((n_paths,), i * dt, jnp.float32)
        drift, diffusion = sde.sde(x, t)
        z = jax.random.normal(key, x.shape)
        return x + drift * dt + diffusion[:, None] * np.sqrt(dt) * z, None

    keys = jax.random.split(rng, n_steps)
    half = n_steps // 2
    run = jax.jit(lambda x, i, k: jax.lax.scan(step, x, (i, k))[0])
    x_half = run(x, jnp.arange(half), keys[:half])
    x_end = run(x_half, jnp.arange(half, n_steps), keys[half:])
    return np.asarray(x_half, np.float64), np.asarray(x_end, np.float64)


@pytest.mark.parametrize("name", sorted(SDES))
def test_marginal_prob_matches_simulation(name):
    sde = SDES[name]()
    x0 = np.array([1.5, -0.7])
    n = 20000
    samples = _simulate_forward(sde, x0, n, 2000, jax.random.key(0))
    for t, x in zip((0.5 * sde.T, sde.T), samples, strict=True):
        mean, std = sde.marginal_prob(jnp.asarray(x0, jnp.float32)[None], jnp.array([t]))
        mean, std = np.asarray(mean[0], np.float64), float(std[0])
        # 5 standard errors of the Monte-Carlo mean and standard deviation.
        np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * std / np.sqrt(n))
        np.testing.assert_array_less(np.abs(x.std(0) - std), 5 * std / np.sqrt(2 * n))


@pytest.mark.parametrize("name", sorted(SDES))
def test_prior_logp_is_gaussian_density(name):
    sde = SDES[name]()
    z = sde.prior_sampling(jax.random.key(1), (5, 3, 4, 2))
    prior_std = 50.0 if name == "ve" else 1.0
    expected = scipy.stats.norm.logpdf(np.asarray(z, np.float64), scale=prior_std)
    np.testing.assert_allclose(sde.prior_logp(z), expected.reshape(5, -1).sum(-1), rtol=1e-5)
    # Prior samples have the prior's standard deviation.
    big = np.asarray(sde.prior_sampling(jax.random.key(2), (20000, 4)))
    assert abs(big.std() / prior_std - 1) < 5 / np.sqrt(2 * big.size)


def test_ve_discretize_is_smld_chain():
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=100)
    i = np.array([0, 1, 37, 99])
    # Mid-cell times avoid float32 ties in the index i = int(t (N - 1)).
    t = jnp.asarray((i + 0.5) / (sde.N - 1), jnp.float32).clip(0, 1)
    x = jax.random.normal(jax.random.key(0), (4, 3))
    f, G = sde.discretize(x, t)
    sigmas = 0.01 * (50.0 / 0.01) ** (np.arange(100) / 99)
    previous = np.where(i == 0, 0.0, sigmas[np.maximum(i - 1, 0)])
    np.testing.assert_allclose(f, 0.0)
    np.testing.assert_allclose(G, np.sqrt(sigmas[i] ** 2 - previous**2), rtol=1e-4)


def test_vp_discretize_is_ddpm_chain():
    sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=100)
    i = np.array([0, 1, 50, 98])
    t = jnp.asarray((i + 0.5) / (sde.N - 1), jnp.float32)
    x = jax.random.normal(jax.random.key(0), (4, 3))
    f, G = sde.discretize(x, t)
    betas = 0.1 / 100 + np.arange(100) * (20.0 - 0.1) / (100 * 99)
    np.testing.assert_allclose(G, np.sqrt(betas[i]), rtol=1e-5)
    np.testing.assert_allclose(f, (np.sqrt(1 - betas[i]) - 1)[:, None] * np.asarray(x),
                               rtol=1e-4, atol=1e-7)


def test_subvp_discretize_is_euler_maruyama():
    sde = sde_lib.subVPSDE(N=250)
    t = jnp.array([0.1, 0.6])
    x = jax.random.normal(jax.random.key(0), (2, 3))
    f, G = sde.discretize(x, t)
    drift, diffusion = sde.sde(x, t)
    np.testing.assert_allclose(f, drift / 250, rtol=1e-6)
    np.testing.assert_allclose(G, diffusion / np.sqrt(250), rtol=1e-6)


@pytest.mark.parametrize("name", sorted(SDES))
def test_reverse_drift_formula(name):
    sde = SDES[name]()
    x = jax.random.normal(jax.random.key(0), (3, 2, 2))
    t = jnp.array([0.05, 0.5, 0.9])
    score_fn = lambda x, t: jnp.sin(x) * t[:, None, None]
    drift, diffusion = sde.sde(x, t)
    g2 = np.asarray(diffusion**2)[:, None, None]
    score = np.asarray(score_fn(x, t))
    rev_drift, rev_diffusion = sde.reverse(score_fn).sde(x, t)
    np.testing.assert_allclose(rev_drift, drift - g2 * score, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rev_diffusion, diffusion)
    ode_drift, ode_diffusion = sde.reverse(score_fn, probability_flow=True).sde(x, t)
    np.testing.assert_allclose(ode_drift, drift - 0.5 * g2 * score, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ode_diffusion, 0.0)
    # The reverse discretization: f - G^2 score with the forward chain's (f, G).
    f, G = sde.discretize(x, t)
    rev_f, rev_G = sde.reverse(score_fn).discretize(x, t)
    np.testing.assert_allclose(rev_f, f - np.asarray(G**2)[:, None, None] * score,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rev_G, G)


def test_ancestral_availability_and_langevin_alpha():
    ve, vp, subvp = SDES["ve"](), SDES["vp"](), SDES["subvp"]()
    assert ve.has_ancestral_update and vp.has_ancestral_update
    assert not subvp.has_ancestral_update
    t = jnp.array([0.0, 0.5, 1.0])
    np.testing.assert_allclose(ve.langevin_alpha(t), 1.0)
    i = (np.asarray(t) * 999).astype(int)
    np.testing.assert_allclose(vp.langevin_alpha(t), vp.alphas[i], rtol=1e-6)


def _config(sde_name):
    config = ml_collections.ConfigDict()
    config.training = ml_collections.ConfigDict({"sde": sde_name})
    config.model = ml_collections.ConfigDict({
        "sigma_min": 0.02, "sigma_max": 30.0, "beta_min": 0.2, "beta_max": 10.0,
        "num_scales": 77})
    return config


def test_get_sde():
    ve = sde_lib.get_sde(_config("vesde"))
    assert isinstance(ve, sde_lib.VESDE)
    assert (ve.sigma_min, ve.sigma_max, ve.N) == (0.02, 30.0, 77)
    vp = sde_lib.get_sde(_config("VPSDE"))
    assert isinstance(vp, sde_lib.VPSDE) and (vp.beta_0, vp.beta_1, vp.N) == (0.2, 10.0, 77)
    assert isinstance(sde_lib.get_sde(_config("subvpsde")), sde_lib.subVPSDE)
    with pytest.raises(ValueError, match="vesde.*vpsde"):
        sde_lib.get_sde(_config("brownian"))


# ---------------------------------------------------------------------------------------------
# Discrete tables: jnp float32 arrays (computed in float64) that code written for the reference
# indexes with traced timesteps, e.g. in a custom predictor.


def test_discrete_tables_are_float32_jax_arrays_with_float64_values():
    ve = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=1000)
    vp = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000)
    subvp = sde_lib.subVPSDE(beta_min=0.1, beta_max=20.0, N=1000)
    sigmas = np.exp(np.linspace(np.log(0.01), np.log(50.0), 1000))
    betas = np.linspace(0.1 / 1000, 20.0 / 1000, 1000)
    abar = np.cumprod(1.0 - betas)
    want = {
        (ve, "discrete_sigmas"): sigmas,
        (vp, "discrete_betas"): betas,
        (vp, "alphas"): 1.0 - betas,
        (vp, "alphas_cumprod"): abar,
        (vp, "sqrt_alphas_cumprod"): np.sqrt(abar),
        (vp, "sqrt_1m_alphas_cumprod"): np.sqrt(1.0 - abar),
        (subvp, "discrete_betas"): betas,
        (subvp, "alphas"): 1.0 - betas,
    }
    for (sde, name), values in want.items():
        table = getattr(sde, name)
        assert isinstance(table, jax.Array) and table.dtype == jnp.float32, name
        # Exactly the float64 values rounded once to float32.
        np.testing.assert_array_equal(np.asarray(table), values.astype(np.float32), err_msg=name)
    assert ve.discrete_sigmas[0] == np.float32(0.01) and ve.discrete_sigmas[-1] == np.float32(50)


def test_ve_ladder_is_one_function():
    ladder = sde_lib.ve_discrete_sigmas(0.02, 30.0, 77)
    assert ladder.dtype == np.float64 and ladder.shape == (77,)
    np.testing.assert_allclose(ladder, 0.02 * (30.0 / 0.02) ** (np.arange(77) / 76), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(sde_lib.VESDE(0.02, 30.0, 77).discrete_sigmas),
                                  ladder.astype(np.float32))


@sampling.register_predictor(name="test_reference_style_ancestral")
class ReferenceStyleAncestral(sampling.Predictor):
    """Written as yang-song/score_sde's AncestralSamplingPredictor: it indexes the SDE's
    discrete tables with a timestep traced under jit."""

    def update_fn(self, rng, x, t):
        sde = self.sde
        timestep = (t * (sde.N - 1) / sde.T).astype(jnp.int32)
        score = self.score_fn(x, t)
        if isinstance(sde, sde_lib.VESDE):
            sigma = sde.discrete_sigmas[timestep]
            adjacent = jnp.where(timestep == 0, jnp.zeros(t.shape),
                                 sde.discrete_sigmas[timestep - 1])
            x_mean = x + batch_mul(score, sigma**2 - adjacent**2)
            std = jnp.sqrt((adjacent**2 * (sigma**2 - adjacent**2)) / (sigma**2))
        else:
            beta = sde.discrete_betas[timestep]
            x_mean = batch_mul(x + batch_mul(beta, score), 1.0 / jnp.sqrt(1.0 - beta))
            std = jnp.sqrt(beta)
        noise = jax.random.normal(rng, x.shape)
        return x_mean + batch_mul(std, noise), x_mean


@pytest.mark.parametrize("name", ["ve", "vp"])
def test_reference_style_custom_predictor_runs_under_jit(name):
    sde = {"ve": lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=5.0, N=20),
           "vp": lambda: sde_lib.VPSDE(N=50)}[name]()
    # The exact score of data N(0, I) under either SDE: -x / (mean_coeff^2 + std^2).
    def score_fn(x, t):
        mean, std = sde.marginal_prob(jnp.ones((x.shape[0],)), t)
        return batch_mul(-1.0 / (mean**2 + std**2), x)

    shape = (4, 3)
    run = lambda predictor: sampling.get_pc_sampler(
        sde, shape, predictor, "none", lambda x: x, snr=0.16)(jax.random.key(3), score_fn)
    custom, nfe = run("test_reference_style_ancestral")
    builtin, _ = run("ancestral_sampling")
    assert nfe == sde.N and custom.shape == shape
    assert np.all(np.isfinite(np.asarray(custom)))
    # The same chain as the built-in ancestral predictor (same draws, same arithmetic).
    np.testing.assert_allclose(custom, builtin, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(SDES))
def test_gaussian_marginal_and_half_log_snr_inverse(name):
    sde = SDES[name]()
    with jax.enable_x64(True):  # float64, so that the inverse is checked to 1e-9
        t = jnp.asarray(np.geomspace(1e-4, 1.0, 40))
        alpha, sigma = sde.marginal_coefficients(t)
        mean, std = sde.marginal_prob(jnp.ones((40, 3)), t)
        np.testing.assert_allclose(alpha, mean[:, 0], rtol=1e-12)
        np.testing.assert_allclose(sigma, std, rtol=1e-12)
        lam = sde.half_log_snr(t)
        np.testing.assert_allclose(lam, np.log(np.asarray(alpha) / np.asarray(sigma)), rtol=1e-12)
        assert np.all(np.diff(np.asarray(lam)) < 0)
        # The closed form (VE, VP, sub-VP) and the generic bisection both invert lambda.
        assert type(sde).t_from_half_log_snr is not sde_lib.SDE.t_from_half_log_snr
        np.testing.assert_allclose(sde.t_from_half_log_snr(lam), t, rtol=1e-9)
        np.testing.assert_allclose(sde_lib.SDE.t_from_half_log_snr(sde, lam), t, rtol=1e-9)
    # In float32 the round trip is as good as lambda's own rounding allows.
    t = jnp.asarray(np.linspace(0.01, 1.0, 30), jnp.float32)
    np.testing.assert_allclose(sde.t_from_half_log_snr(sde.half_log_snr(t)), t, rtol=1e-4)
