"""get_score_fn label conventions and scalings, with a stub network that records its inputs."""

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import sde_lib
from models import utils as mutils


class RecordingStub(nn.Module):
    """Outputs `labels` broadcast over the image (or ones), so the caller can read both
    the labels the network was given and how its output was turned into a score."""

    emit_labels: bool = True

    @nn.compact
    def __call__(self, x, labels, train=False):
        self.sow("intermediates", "labels", labels)
        value = labels.astype(jnp.float32) if self.emit_labels else jnp.ones(x.shape[0])
        return jnp.zeros_like(x) + value[:, None, None, None]


T = np.array([1e-3, 0.25, 0.5, 0.999], np.float32)
X = jnp.zeros((4, 2, 2, 1))


def _score(sde, continuous, emit_labels=True):
    score_fn = mutils.get_score_fn(sde, RecordingStub(emit_labels), {}, {},
                                   continuous=continuous)
    return np.asarray(score_fn(X, jnp.asarray(T)))[:, 0, 0, 0]


def test_ve_labels_and_scaling():
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=1000)
    sigma = 0.01 * (50.0 / 0.01) ** T
    # continuous: label sigma(t), the output is the score itself
    np.testing.assert_allclose(_score(sde, True), sigma, rtol=1e-5)
    np.testing.assert_allclose(_score(sde, True, emit_labels=False), 1.0)
    # discrete: label round((T - t)(N - 1)) indexes sigmas from sigma_max down
    np.testing.assert_array_equal(_score(sde, False), np.round((1 - T) * 999))


@pytest.mark.parametrize("cls", [sde_lib.VPSDE, sde_lib.subVPSDE])
def test_vp_and_subvp_continuous_labels_and_scaling(cls):
    sde = cls(beta_min=0.1, beta_max=20.0, N=1000)
    log_mean = -0.25 * T**2 * 19.9 - 0.5 * T * 0.1
    std = np.sqrt(1 - np.exp(2 * log_mean)) if cls is sde_lib.VPSDE else 1 - np.exp(2 * log_mean)
    # label 999 t; score = -output / std(t)
    np.testing.assert_allclose(_score(sde, True), -999 * T / std, rtol=1e-4)
    np.testing.assert_allclose(_score(sde, True, emit_labels=False), -1 / std, rtol=1e-4)


def test_vp_discrete_labels_and_scaling():
    sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000)
    labels = T * 999
    betas = np.linspace(0.1 / 1000, 20.0 / 1000, 1000)
    std = np.sqrt(1 - np.cumprod(1 - betas))[labels.astype(np.int32)]
    np.testing.assert_allclose(_score(sde, False), -labels / std, rtol=1e-4)


def test_subvp_has_no_discrete_convention():
    with pytest.raises(NotImplementedError, match="subVPSDE has no discrete label convention"):
        _score(sde_lib.subVPSDE(), False)


def test_labels_reach_the_network_unchanged():
    sde = sde_lib.VESDE(N=10)
    model = RecordingStub()
    _, state = model.apply({}, X, sde.model_labels(jnp.asarray(T), False),
                           mutable=["intermediates"])
    np.testing.assert_array_equal(state["intermediates"]["labels"][0], np.round((1 - T) * 9))
