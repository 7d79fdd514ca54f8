"""Inverse problems with an unconditional score model (Song et al. 2021, Sec. 5, App. I).

Inpainting and colorization are PC sampling in which, after every corrector and predictor
update, the known part of the sample is replaced by a fresh forward perturbation of the
observation (App. I.2): inpainting in pixel space with a mask, colorization in an orthonormal
colour basis whose first channel is the gray direction. Class-conditional sampling adds the
gradient of a noise-conditional classifier's log-probability to the score (Eq. 14, App. I.1).

Like `sampling`, everything takes the score function as an argument and compiles one program
per score function object. Images are [B, H, W, C]; masks are 1 where the pixel is known.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import sampling
import sde_lib
from sde_lib import batch_mul

# Orthonormal colour basis: columns gray (1, 1, 1)/sqrt 3, then two chroma directions.
_COLOR_BASIS = np.stack([np.ones(3) / np.sqrt(3), np.array([-2.0, 1.0, 1.0]) / np.sqrt(6),
                         np.array([0.0, 1.0, -1.0]) / np.sqrt(2)], axis=1).astype(np.float32)


def decouple(x):
    """RGB [..., 3] -> (gray, chroma, chroma) coordinates [..., 3]."""
    return jnp.einsum("...i,ij->...j", x, _COLOR_BASIS)


def couple(y):
    """Inverse of `decouple` (the basis is orthonormal)."""
    return jnp.einsum("...j,ij->...i", y, _COLOR_BASIS)


def _parts(sde, predictor, corrector, snr, n_steps, probability_flow):
    predictor_cls = sampling._resolve(predictor, sampling.get_predictor, sampling.Predictor,
                                      "predictor")
    corrector_cls = sampling._resolve(corrector, sampling.get_corrector, sampling.Corrector,
                                      "corrector")
    # Fail on invalid combinations before compiling (as get_pc_sampler does).
    predictor_cls(sde, sampling._unusable_score_fn, probability_flow)
    corrector_cls(sde, sampling._unusable_score_fn, snr, n_steps)
    return predictor_cls, corrector_cls


def _get_replacement_sampler(sde, predictor, corrector, inverse_scaler, snr, n_steps,
                             probability_flow, denoise, eps, to_basis, from_basis):
    """PC sampling where the known coordinates (in the basis `to_basis`) are re-imposed after
    every update. Returns sample(rng, score_fn, data, mask): data and mask are given in that
    basis, mask is 1 where known."""
    predictor_cls, corrector_cls = _parts(sde, predictor, corrector, snr, n_steps,
                                          probability_flow)

    def sample(rng, score_fn, data, mask):
        predictor_obj = predictor_cls(sde, score_fn, probability_flow)
        corrector_obj = corrector_cls(sde, score_fn, snr, n_steps)
        batch = data.shape[0]

        def impose(rng, x, x_mean, t):
            # Known coordinates <- a fresh sample of p_t(. | data) (App. I.2).
            mean, std = sde.marginal_prob(data, t)
            noisy = mean + batch_mul(std, jax.random.normal(rng, data.shape, data.dtype))
            y, y_mean = to_basis(x), to_basis(x_mean)
            return (from_basis(y * (1 - mask) + noisy * mask),
                    from_basis(y_mean * (1 - mask) + mean * mask))

        rng, prior_rng = jax.random.split(rng)
        prior = to_basis(sde.prior_sampling(prior_rng, data.shape))
        x = from_basis(data * mask + prior * (1 - mask))
        timesteps = jnp.linspace(sde.T, eps, sde.N)

        def step(i, carry):
            x, _ = carry
            t = jnp.full((batch,), timesteps[i], x.dtype)
            keys = jax.random.split(jax.random.fold_in(rng, i), 4)
            # Corrector, then re-impose the observation.
            x, x_mean = corrector_obj.update_fn(keys[0], x, t)
            x, x_mean = impose(keys[1], x, x_mean, t)
            # Predictor, then re-impose the observation.
            x, x_mean = predictor_obj.update_fn(keys[2], x, t)
            return impose(keys[3], x, x_mean, t)

        x, x_mean = jax.lax.fori_loop(0, sde.N, step, (x, x))
        return inverse_scaler(x_mean if denoise else x)

    return jax.jit(sample, static_argnums=1)


def get_pc_inpainter(sde: sde_lib.SDE, predictor, corrector, inverse_scaler: Callable,
                     snr: float, n_steps: int = 1, probability_flow: bool = False,
                     denoise: bool = True, eps: float = 1e-5):
    """Returns `inpainter(rng, score_fn, data, mask) -> samples`.

    data: [B, ...] in model space; mask: like data (or broadcastable), 1 where known.
    """
    compiled = _get_replacement_sampler(sde, predictor, corrector, inverse_scaler, snr, n_steps,
                                        probability_flow, denoise, eps, lambda x: x,
                                        lambda y: y)

    def inpainter(rng, score_fn, data, mask):
        data = jnp.asarray(data)
        return compiled(rng, score_fn, data, jnp.broadcast_to(mask, data.shape).astype(data.dtype))

    return inpainter


def get_pc_colorizer(sde: sde_lib.SDE, predictor, corrector, inverse_scaler: Callable,
                     snr: float, n_steps: int = 1, probability_flow: bool = False,
                     denoise: bool = True, eps: float = 1e-5):
    """Returns `colorizer(rng, score_fn, gray_scale_img) -> samples` [B, H, W, 3].

    gray_scale_img: [B, H, W, 3] in model space with equal channels (or [B, H, W, 1]).
    """
    compiled = _get_replacement_sampler(sde, predictor, corrector, inverse_scaler, snr, n_steps,
                                        probability_flow, denoise, eps, decouple, couple)

    def colorizer(rng, score_fn, gray_scale_img):
        gray = jnp.asarray(gray_scale_img)
        gray = jnp.broadcast_to(jnp.mean(gray, axis=-1, keepdims=True), gray.shape[:-1] + (3,))
        mask = jnp.zeros_like(gray).at[..., 0].set(1.0)
        return compiled(rng, score_fn, decouple(gray), mask)

    return colorizer


def get_pc_conditional_sampler(sde: sde_lib.SDE, shape, predictor, corrector,
                               inverse_scaler: Callable, snr: float, n_steps: int = 1,
                               probability_flow: bool = False, denoise: bool = True,
                               eps: float = 1e-5):
    """Class-conditional PC sampler with classifier guidance.

    Returns `sampler(rng, score_fn, log_prob_fn, labels) -> samples` where
    `log_prob_fn(x, t) -> [B, n_classes]` are a noise-conditional classifier's log-probabilities
    of x at time t (wrap the network with its noise labels, e.g. sigma(t) for VE) and
    labels [B] int. The sampler uses the conditional score
    grad log p_t(x | y) = score_fn(x, t) + grad_x log p_t(y | x).
    """
    shape = tuple(int(s) for s in shape)
    base = sampling.get_pc_sampler(sde, shape, predictor, corrector, inverse_scaler, snr,
                                   n_steps, probability_flow, denoise, eps)

    def sample(rng, score_fn, log_prob_fn, labels):
        def conditional_score(x, t):
            grad = jax.grad(lambda x: jnp.sum(jnp.take_along_axis(
                log_prob_fn(x, t), labels[:, None], axis=1)))(x)
            return score_fn(x, t) + grad

        return base(rng, conditional_score)[0]

    compiled = jax.jit(sample, static_argnums=(1, 2))

    def sampler(rng, score_fn, log_prob_fn, labels):
        return compiled(rng, score_fn, log_prob_fn, jnp.asarray(labels, jnp.int32))

    return sampler
