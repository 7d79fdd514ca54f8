"""Probability-flow likelihoods against the exact log-density of Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_utils import GaussianMixture
from test_sampling import BrownianSDE

import likelihood
import sde_lib

EPS = 1e-5
# Diagonal Gaussian data in model space: the probability-flow drift is then linear with a
# diagonal Jacobian, so a Rademacher probe gives the divergence exactly (v_i^2 = 1) and every
# example's bits/dim must match the closed form.
DATA = GaussianMixture.gaussian([0.3, -0.2, 0.5, 0.0], [0.3, 0.5, 0.2, 0.4])
SDES = {
    "ve": lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0),
    "vp": lambda: sde_lib.VPSDE(),
    "subvp": lambda: sde_lib.subVPSDE(),
    "brownian": lambda: BrownianSDE(sigma=50.0),
}
CENTERED = lambda x: (x + 1.0) / 2.0  # data scaled to [-1, 1]: offset 8 + log2(1/2) = 7


def _marginal(sde, t):
    m, std = sde.marginal_prob(jnp.ones((1, 1)), jnp.array([t]))
    return float(m[0, 0]), float(std[0])


def exact_latent(sde, x):
    """The probability-flow map eps -> T of Gaussian data, per dimension affine:
    z = m_T mu + (x - m_eps mu) sqrt(v_T / v_eps), with v_t = m_t^2 s^2 + std_t^2."""
    (m0, std0), (m1, std1) = _marginal(sde, EPS), _marginal(sde, sde.T)
    mu, s = DATA.means[0], DATA.stds[0]
    v0, v1 = m0**2 * s**2 + std0**2, m1**2 * s**2 + std1**2
    return m1 * mu + (np.asarray(x, np.float64) - m0 * mu) * np.sqrt(v1 / v0)


def exact_bpd(sde, x, offset):
    """The model's exact bits/dim of x [B, D] plus offset.

    The model density is the prior pushed through the flow, so log p_model(x) =
    log p_eps(x) + log prior(z) - log p_T(z), p_eps = N(m_eps mu, m_eps^2 s^2 + std_eps^2).
    """
    x = np.asarray(x, np.float64)
    z = exact_latent(sde, x)
    logp = (DATA.log_prob_np(x, *_marginal(sde, EPS)) - DATA.log_prob_np(z, *_marginal(sde, sde.T))
            + np.asarray(sde.prior_logp(jnp.asarray(z, jnp.float32)), np.float64))
    return -logp / (x.shape[1] * np.log(2)) + offset


@pytest.mark.parametrize("name", sorted(SDES))
def test_rademacher_bpd_matches_exact_density(name):
    sde = SDES[name]()
    x = DATA.sample(jax.random.key(0), 256)
    fn = likelihood.get_likelihood_fn(sde, CENTERED, eps=EPS)
    bpd, z, nfe = fn(jax.random.key(1), DATA.score_fn(sde), x)
    assert bpd.shape == (256,) and z.shape == x.shape and int(nfe) > 10
    np.testing.assert_allclose(bpd, exact_bpd(sde, np.asarray(x), 7.0), atol=0.01)
    z_exact = exact_latent(sde, x)
    np.testing.assert_allclose(z, z_exact, atol=1e-3 * np.abs(z_exact).max())


def test_gaussian_probe_is_unbiased_and_offset_follows_scaler():
    # Gaussian probes give v^T J v = sum_i J_ii v_i^2, a noisy estimate: the per-example error
    # is a few tenths of a bit in 4-D, so we test that its batch mean is zero within 4 SE.
    sde = SDES["vp"]()
    x = DATA.sample(jax.random.key(2), 1000)
    fn = likelihood.get_likelihood_fn(sde, lambda x: x, hutchinson_type="Gaussian", eps=EPS)
    bpd, _, _ = fn(jax.random.key(3), DATA.score_fn(sde), x)
    err = np.asarray(bpd, np.float64) - exact_bpd(sde, np.asarray(x), 8.0)
    assert err.std() > 0.1  # the probe really is Gaussian (Rademacher would be exact here)
    assert abs(err.mean()) < 4 * err.std() / np.sqrt(len(err))


def test_scipy_rk45_agrees_with_diffrax():
    sde = SDES["subvp"]()
    x = DATA.sample(jax.random.key(4), 64)
    kwargs = dict(eps=EPS, rtol=1e-5, atol=1e-5)
    dfx = likelihood.get_likelihood_fn(sde, CENTERED, **kwargs)(
        jax.random.key(5), DATA.score_fn(sde), x)
    scp = likelihood.get_likelihood_fn(sde, CENTERED, method="scipy_rk45", **kwargs)(
        jax.random.key(5), DATA.score_fn(sde), x)
    np.testing.assert_allclose(dfx[0], scp[0], atol=2e-3)
    np.testing.assert_allclose(dfx[1], scp[1], atol=2e-3)
    assert isinstance(scp[2], int) and abs(int(dfx[2]) - scp[2]) <= 0.25 * scp[2]
    np.testing.assert_allclose(scp[0], exact_bpd(sde, np.asarray(x), 7.0), atol=0.01)


def test_likelihood_fn_under_outer_jit():
    sde = SDES["vp"]()
    x = DATA.sample(jax.random.key(6), 32)
    fn = likelihood.get_likelihood_fn(sde, CENTERED, eps=EPS)
    make = lambda scale: (lambda y, t: scale * DATA.score_fn(sde)(y, t))
    jitted = jax.jit(lambda rng, scale, x: fn(rng, make(scale), x)[0])
    np.testing.assert_allclose(jitted(jax.random.key(7), 1.0, x),
                               exact_bpd(sde, np.asarray(x), 7.0), atol=0.01)


def test_bad_arguments_list_valid_choices():
    with pytest.raises(ValueError, match="Rademacher.*Gaussian"):
        likelihood.get_likelihood_fn(SDES["vp"](), CENTERED, hutchinson_type="Bernoulli")
    with pytest.raises(ValueError, match="dopri5"):
        likelihood.get_likelihood_fn(SDES["vp"](), CENTERED, method="euler")
