"""Inverse problems with an unconditional score model (Song et al. 2021, Sec. 5, App. I).

Inpainting and colorization are the PC sampler of `sampling.pc_loop` with a projection: after
every corrector and predictor update the known part of the sample is replaced by a fresh forward
perturbation of the observation (App. I.2); inpainting works in pixel space with a mask,
colorization in an orthonormal colour basis whose first channel is the gray direction.
Class-conditional sampling adds the gradient of a noise-conditional classifier's
log-probability to the score (Eq. 14, App. I.1).

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

# Orthonormal colour basis: columns gray (1, 1, 1)/sqrt 3, then two chroma directions.
_COLOR_BASIS = np.stack([np.ones(3) / np.sqrt(3), np.array([-2.0, 1.0, 1.0]) / np.sqrt(6),
                         np.array([0.0, 1.0, -1.0]) / np.sqrt(2)], axis=1).astype(np.float32)
# Per-channel mean and std of CIFAR-10's training images: the input normalisation of the
# reference's noise-conditional classifier (yang-song/score_sde, models/utils.get_logit_fn).
CIFAR10_MEAN = (0.49139968, 0.48215841, 0.44653091)
CIFAR10_STD = (0.24703223, 0.24348513, 0.26158784)


def decouple(x):
    """RGB [..., 3] -> (gray, chroma, chroma) coordinates [..., 3]."""
    return jnp.einsum("...i,ij->...j", x, _COLOR_BASIS)


def couple(y):
    """Inverse of `decouple` (the basis is orthonormal)."""
    return jnp.einsum("...j,ij->...i", y, _COLOR_BASIS)


def _replacement_parts(sde, shape, predictor, corrector, inverse_scaler, snr, n_steps,
                       probability_flow, denoise, eps, to_basis, from_basis):
    """PC sampling in which the known coordinates (in the basis `to_basis`) are re-imposed after
    every update, as `sampling.LoopParts` with init(rng, data, mask): data and mask are given in
    that basis, mask is 1 where known."""

    def project(rng, x, x_mean, t, data, mask):
        # Known coordinates <- a fresh sample of p_t(. | data) (App. I.2).
        noisy, mean, _ = sde.perturb(data, t, jax.random.normal(rng, data.shape, data.dtype))
        y, y_mean = to_basis(x), to_basis(x_mean)
        return (from_basis(y * (1 - mask) + noisy * mask),
                from_basis(y_mean * (1 - mask) + mean * mask))

    def start(prior, data, mask):
        return from_basis(data * mask + to_basis(prior) * (1 - mask))

    return sampling.get_pc_loop_parts(sde, shape, predictor, corrector, inverse_scaler, snr,
                                      n_steps, probability_flow, denoise, eps, project=project,
                                      start=start)


def _replacement_sampler(parts_of):
    """A jitted sample(rng, score_fn, data, mask) of the LoopParts `parts_of(shape)`."""

    def sample(rng, score_fn, data, mask):
        return sampling.run_loop_parts(parts_of(data.shape), rng, score_fn, data, mask)

    return jax.jit(sample, static_argnums=1)


def get_pc_inpainter_parts(sde: sde_lib.SDE, shape, predictor, corrector,
                           inverse_scaler: Callable, snr: float, n_steps: int = 1,
                           probability_flow: bool = False, denoise: bool = True,
                           eps: float = 1e-5) -> sampling.LoopParts:
    """`get_pc_inpainter`'s sampler as `sampling.LoopParts`: init(rng, data, mask) with data
    [shape] in model space and mask like data (or broadcastable), 1 where known."""
    parts = _replacement_parts(sde, shape, predictor, corrector, inverse_scaler, snr, n_steps,
                               probability_flow, denoise, eps, lambda x: x, lambda y: y)

    def init(rng, data, mask):
        data = jnp.asarray(data)
        return parts.init(rng, data, jnp.broadcast_to(mask, data.shape).astype(data.dtype))

    return parts._replace(init=init)


def get_pc_colorizer_parts(sde: sde_lib.SDE, shape, predictor, corrector,
                           inverse_scaler: Callable, snr: float, n_steps: int = 1,
                           probability_flow: bool = False, denoise: bool = True,
                           eps: float = 1e-5) -> sampling.LoopParts:
    """`get_pc_colorizer`'s sampler as `sampling.LoopParts`: init(rng, gray_scale_img)."""
    shape = tuple(shape[:-1]) + (3,)
    parts = _replacement_parts(sde, shape, predictor, corrector, inverse_scaler, snr, n_steps,
                               probability_flow, denoise, eps, decouple, couple)

    def init(rng, gray_scale_img):
        gray = jnp.asarray(gray_scale_img)
        gray = jnp.broadcast_to(jnp.mean(gray, axis=-1, keepdims=True), gray.shape[:-1] + (3,))
        mask = jnp.zeros_like(gray).at[..., 0].set(1.0)
        return parts.init(rng, decouple(gray), mask)

    return parts._replace(init=init)


def get_pc_inpainter(sde: sde_lib.SDE, predictor, corrector, inverse_scaler: Callable,
                     snr: float, n_steps: int = 1, probability_flow: bool = False,
                     denoise: bool = True, eps: float = 1e-5):
    """Returns `inpainter(rng, score_fn, data, mask) -> samples`.

    data: [B, ...] in model space; mask: like data (or broadcastable), 1 where known.
    predictor / corrector: registered names, classes, or None (meaning 'none').
    In parts (progress between them): `get_pc_inpainter_parts`.
    """
    # Bad names and combinations fail here, not at the first call.
    sampling.get_pc_parts(sde, predictor, corrector, snr, n_steps, probability_flow)
    compiled = _replacement_sampler(lambda shape: get_pc_inpainter_parts(
        sde, shape, predictor, corrector, inverse_scaler, snr, n_steps, probability_flow,
        denoise, eps))

    def inpainter(rng, score_fn, data, mask):
        data = jnp.asarray(data)
        return compiled(rng, score_fn, data, jnp.asarray(mask, data.dtype))

    return inpainter


def get_pc_colorizer(sde: sde_lib.SDE, predictor, corrector, inverse_scaler: Callable,
                     snr: float, n_steps: int = 1, probability_flow: bool = False,
                     denoise: bool = True, eps: float = 1e-5):
    """Returns `colorizer(rng, score_fn, gray_scale_img) -> samples` [B, H, W, 3].

    gray_scale_img: [B, H, W, 3] in model space with equal channels (or [B, H, W, 1]).
    In parts (progress between them): `get_pc_colorizer_parts`.
    """
    sampling.get_pc_parts(sde, predictor, corrector, snr, n_steps, probability_flow)

    def sample(rng, score_fn, gray_scale_img):
        parts = get_pc_colorizer_parts(sde, gray_scale_img.shape, predictor, corrector,
                                       inverse_scaler, snr, n_steps, probability_flow, denoise,
                                       eps)
        return sampling.run_loop_parts(parts, rng, score_fn, gray_scale_img)

    compiled = jax.jit(sample, static_argnums=1)

    def colorizer(rng, score_fn, gray_scale_img):
        return compiled(rng, score_fn, jnp.asarray(gray_scale_img))

    return colorizer


def get_logit_fn(classifier, classifier_params, image_mean=CIFAR10_MEAN, image_std=CIFAR10_STD):
    """Returns `logit_fn(data [B, H, W, C], noise_scale [B]) -> logits [B, n_classes]`.

    The classifier is a noise-conditional flax module applied as
    `classifier.apply({'params': p}, x, noise_scale, train=False)` (the WRN of App. I.1). Its
    inputs are normalised per channel by `image_mean` / `image_std` (CIFAR-10's, as in the
    reference; None for no normalisation).
    """

    def logit_fn(data, noise_scale):
        if image_mean is not None:
            data = (data - jnp.asarray(image_mean)) / jnp.asarray(image_std)
        return classifier.apply({"params": classifier_params}, data, noise_scale, train=False)

    return logit_fn


def get_classifier_grad_fn(logit_fn):
    """Returns `grad_fn(data, noise_scale, labels [B] int) -> grad_x log p(labels | x)`."""

    def grad_fn(data, noise_scale, labels):
        def log_prob(x):
            logp = jax.nn.log_softmax(logit_fn(x, noise_scale), axis=-1)
            return jnp.sum(jnp.take_along_axis(logp, labels[:, None], axis=1))

        return jax.grad(log_prob)(data)

    return grad_fn


def get_conditional_score_fn(sde: sde_lib.SDE, score_fn, classifier, classifier_params, labels,
                             scale: float = 1.0, image_mean=CIFAR10_MEAN,
                             image_std=CIFAR10_STD):
    """The conditional score of Eq. 14: score_fn(x, t) + scale * grad_x log p_t(labels | x),
    the classifier seeing x and the noise scale std(t) (see `get_pc_conditional_sampler`)."""
    grad_fn = get_classifier_grad_fn(get_logit_fn(classifier, classifier_params, image_mean,
                                                  image_std))

    def conditional_score(x, t):
        noise_scale = sde.marginal_prob(jnp.zeros_like(x), t)[1]
        return score_fn(x, t) + scale * grad_fn(x, noise_scale, labels)

    return conditional_score


def get_pc_conditional_sampler(sde: sde_lib.SDE, classifier, classifier_params, shape,
                               predictor, corrector, inverse_scaler: Callable, snr: float,
                               n_steps: int = 1, probability_flow: bool = False,
                               denoise: bool = True, eps: float = 1e-5, scale: float = 1.0,
                               image_mean=CIFAR10_MEAN, image_std=CIFAR10_STD):
    """Class-conditional PC sampler with classifier guidance (Eq. 14, App. I.1).

    The classifier (see `get_logit_fn`) sees x and the noise scale std(t) of the SDE's
    perturbation kernel, as in the reference. The sampler follows the conditional score
    score_fn(x, t) + scale * grad_x log p_t(y | x); `scale` 1 is the paper's.

    Returns `sampler(rng, score_fn, labels [B] int) -> samples shaped `shape``.
    """
    shape = tuple(int(s) for s in shape)
    base = sampling.get_pc_sampler(sde, shape, predictor, corrector, inverse_scaler, snr,
                                   n_steps, probability_flow, denoise, eps)

    def sample(rng, score_fn, params, labels):
        return base(rng, get_conditional_score_fn(sde, score_fn, classifier, params, labels,
                                                  scale, image_mean, image_std))[0]

    # The classifier's parameters are an argument, not constants baked into the program.
    compiled = jax.jit(sample, static_argnums=1)

    def sampler(rng, score_fn, labels):
        return compiled(rng, score_fn, classifier_params, jnp.asarray(labels, jnp.int32))

    return sampler
