"""Inverse-problem samplers against exact conditionals of Gaussian data.

With independent coordinates the conditional of the unknown part given the known part is its
marginal, so replacement sampling is exact; for a mixture, score + grad log p_t(y | x) is the
exact score of component y.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gaussian_utils import GaussianMixture

import controllable_generation as cg
import sde_lib

N = 4000
IDENTITY = lambda x: x


def assert_gaussian(x, mean, std, bias=0.02):
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    n = len(x)
    mean, std = np.asarray(mean), np.asarray(std)
    assert np.all(np.abs(x.mean(0) - mean) < 4 * std / np.sqrt(n) + bias * std), x.mean(0)
    assert np.all(np.abs(x.std(0) - std) < 4 * std / np.sqrt(2 * n) + bias * std), x.std(0)


def test_inpainting_keeps_known_and_samples_unknown_from_conditional():
    sde = sde_lib.VPSDE(N=500)
    data = GaussianMixture.gaussian([1.0, -0.5, 0.3, 0.8], [0.5, 1.0, 0.4, 0.6])
    observed = data.sample(jax.random.key(0), N).reshape(N, 1, 1, 4)
    mask = jnp.array([1.0, 1.0, 0.0, 0.0])
    inpainter = cg.get_pc_inpainter(sde, "reverse_diffusion", "langevin", IDENTITY, snr=0.16,
                                    eps=1e-3)
    x = inpainter(jax.random.key(1), data.score_fn(sde), observed, mask)
    assert x.shape == observed.shape
    # Known pixels: the last replacement puts back the perturbed mean m(eps) x_obs.
    m_eps = float(sde.marginal_prob(jnp.ones((1, 1)), jnp.array([1e-3]))[0][0, 0])
    np.testing.assert_allclose(x[..., :2], m_eps * np.asarray(observed[..., :2]), rtol=1e-5,
                               atol=1e-5)
    assert_gaussian(x[..., 2:], data.means[0, 2:], data.stds[0, 2:])


def test_colorization_keeps_gray_and_samples_chroma():
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=20.0, N=500)
    # Independent Gaussian coordinates in the (gray, chroma, chroma) basis.
    coords = GaussianMixture.gaussian([0.5, 0.3, -0.2], [0.3, 0.4, 0.2])
    score_y = coords.score_fn(sde)
    score_fn = lambda x, t: cg.couple(score_y(cg.decouple(x), t))
    y = coords.sample(jax.random.key(0), N).reshape(N, 1, 1, 3)
    rgb = cg.couple(y)
    gray = jnp.broadcast_to(jnp.mean(rgb, axis=-1, keepdims=True), rgb.shape)
    colorizer = cg.get_pc_colorizer(sde, "reverse_diffusion", "langevin", IDENTITY, snr=0.16)
    x = colorizer(jax.random.key(1), score_fn, gray)
    assert x.shape == rgb.shape
    out = np.asarray(cg.decouple(x))
    np.testing.assert_allclose(out[..., 0], np.asarray(y[..., 0]), atol=1e-4)
    assert_gaussian(out[..., 1:], coords.means[0, 1:], coords.stds[0, 1:])
    np.testing.assert_allclose(cg.couple(cg.decouple(rgb)), rgb, atol=1e-6)


def test_classifier_guidance_samples_the_chosen_component():
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=500)
    data = GaussianMixture([0.2, 0.8], [[-2.0, -2.0], [2.0, 2.0]], [[0.5, 0.3], [0.4, 0.6]])
    labels = jnp.arange(N) % 2
    sampler = cg.get_pc_conditional_sampler(sde, (N, 2), "reverse_diffusion", "langevin",
                                            IDENTITY, snr=0.16)
    x = np.asarray(sampler(jax.random.key(0), data.score_fn(sde), data.class_log_prob_fn(sde),
                           labels))
    for k in (0, 1):
        assert_gaussian(x[np.asarray(labels) == k], data.means[k], data.stds[k])


def test_invalid_parts_fail_at_construction():
    with pytest.raises(ValueError, match="ancestral"):
        cg.get_pc_inpainter(sde_lib.subVPSDE(), "ancestral_sampling", "none", IDENTITY, 0.1)
    with pytest.raises(ValueError, match="valid names"):
        cg.get_pc_colorizer(sde_lib.VESDE(), "reverse_diffusion", "hmc", IDENTITY, 0.1)
