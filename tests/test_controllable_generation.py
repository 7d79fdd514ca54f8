"""Inverse-problem samplers against exact conditionals of Gaussian data.

With independent coordinates the conditional of the unknown part given the known part is its
marginal, so replacement sampling is exact; for a mixture, score + grad log p_t(y | x) is the
exact score of component y.
"""

import flax.linen as nn
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


class ExactMixtureClassifier(nn.Module):
    """The exact noise-conditional classifier log p(k | x) of a Gaussian mixture under a VE SDE
    (perturbation kernel N(x0, noise_scale^2 I)), as a flax module with the WRN's call
    signature."""

    mixture: GaussianMixture

    def __call__(self, x, noise_scale, train=False):
        means = jnp.asarray(self.mixture.means, jnp.float32)[None]
        variances = (jnp.asarray(self.mixture.stds, jnp.float32)[None] ** 2
                     + noise_scale[:, None, None] ** 2)
        return self.mixture._component_logp(x, means, variances)


def test_classifier_guidance_samples_the_chosen_component():
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=500)
    data = GaussianMixture([0.2, 0.8], [[-2.0, -2.0], [2.0, 2.0]], [[0.5, 0.3], [0.4, 0.6]])
    labels = jnp.arange(N) % 2
    sampler = cg.get_pc_conditional_sampler(sde, ExactMixtureClassifier(data), {}, (N, 2),
                                            "reverse_diffusion", "langevin", IDENTITY, snr=0.16,
                                            image_mean=None)
    x = np.asarray(sampler(jax.random.key(0), data.score_fn(sde), labels))
    for k in (0, 1):
        assert_gaussian(x[np.asarray(labels) == k], data.means[k], data.stds[k])


def test_guidance_scale_zero_samples_the_unconditional_mixture():
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=500)
    data = GaussianMixture([0.2, 0.8], [[-2.0, -2.0], [2.0, 2.0]], [[0.5, 0.3], [0.4, 0.6]])
    sampler = cg.get_pc_conditional_sampler(sde, ExactMixtureClassifier(data), {}, (N, 2),
                                            "reverse_diffusion", None, IDENTITY, snr=0.16,
                                            image_mean=None, scale=0.0)
    x = np.asarray(sampler(jax.random.key(0), data.score_fn(sde), jnp.zeros(N, jnp.int32)))
    # All labels ask for component 0, but with scale 0 the mixture weights 0.2 / 0.8 remain.
    frac0 = float(np.mean(x[:, 0] < 0))
    assert abs(frac0 - 0.2) < 4 * np.sqrt(0.2 * 0.8 / N), frac0


def test_logit_fn_normalises_like_the_reference():
    class Identity(nn.Module):
        def __call__(self, x, noise_scale, train=False):
            return x.reshape(x.shape[0], -1)

    x = jnp.full((1, 1, 1, 3), 0.5)
    logits = cg.get_logit_fn(Identity(), {})(x, jnp.ones(1))
    expected = (0.5 - np.array(cg.CIFAR10_MEAN)) / np.array(cg.CIFAR10_STD)
    np.testing.assert_allclose(logits[0], expected, rtol=1e-6)
    grad = cg.get_classifier_grad_fn(lambda x, s: x.reshape(1, -1) * 2.0)(
        jnp.zeros((1, 3)), jnp.ones(1), jnp.array([1]))
    # d/dx log softmax(2x)[1] at x = 0: 2 (e_1 - 1/3).
    np.testing.assert_allclose(grad[0], 2.0 * (np.eye(3)[1] - 1.0 / 3.0), rtol=1e-5)


def test_invalid_parts_fail_at_construction():
    with pytest.raises(ValueError, match="ancestral"):
        cg.get_pc_inpainter(sde_lib.subVPSDE(), "ancestral_sampling", "none", IDENTITY, 0.1)
    with pytest.raises(ValueError, match="valid names"):
        cg.get_pc_colorizer(sde_lib.VESDE(), "reverse_diffusion", "hmc", IDENTITY, 0.1)


def test_none_parts_mean_none_as_in_the_reference():
    # Corrector None, predictor None: the inpainter keeps the prior for the unknown part.
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=1.0, N=3)
    data = jnp.ones((2, 1, 1, 2))
    inpainter = cg.get_pc_inpainter(sde, None, None, IDENTITY, 0.1, denoise=True)
    x = inpainter(jax.random.key(0), lambda x, t: jnp.zeros_like(x), data, jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(x[..., 0], 1.0)  # known part: the data's mean at eps (VE: data)
