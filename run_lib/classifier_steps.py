"""The classifier's programs (`run_lib.classifier`): its optimizer, initial state, jitted
train step and the test accuracy at fixed times t, on data perturbed by the config's SDE
(Song et al. 2021, App. I.1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import controllable_generation as cg
import datasets
import losses
from models import utils as mutils
from run_lib.devices import batch_sharded, replicated, to_global

# Input normalisations by config.classifier.input_normalization: (mean, std) per channel.
NORMALIZATIONS = {"none": (None, None), "cifar10": (cg.CIFAR10_MEAN, cg.CIFAR10_STD)}
# The smallest t the classifier is trained and evaluated at (the training objective's eps).
T_EPS = 1e-5


def get_optimizer(config) -> optax.GradientTransformation:
    """The score model's optimizer (`losses.adam`) with config.classifier's settings."""
    c = config.classifier
    decay = c.get("lr_decay", "none")
    return losses.adam(c.lr, warmup=c.warmup, grad_clip=c.grad_clip,
                       weight_decay=float(c.weight_decay), decay=decay,
                       decay_steps=c.n_iters if decay != "none" else 0)


def cross_entropy(logits, labels, smoothing: float = 0.0):
    """Per-example cross-entropy [B] of logits [B, K] against integer labels [B], with label
    smoothing (Szegedy et al. 2016): targets (1 - a) one-hot + a / K. Smoothing bounds the
    logits' scale, and so the guidance gradient, on images whose noise leaves the class
    undecidable (high t)."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def logit_fn(config, classifier, params):
    """logits(x [B, H, W, C] in model space, noise_scale [B]) -> [B, num_classes]."""
    mean, std = NORMALIZATIONS[config.classifier.input_normalization]
    return cg.get_logit_fn(classifier, params, mean, std)


def image_shape(config) -> tuple[int, int, int]:
    return (config.data.image_size, config.data.image_size, config.data.num_channels)


def init_fn(config):
    classifier = mutils.create_classifier_module(config)
    optimizer = get_optimizer(config)

    def init(rng):
        params_rng, state_rng = jax.random.split(rng)
        params = mutils.init_classifier_params(classifier, params_rng, image_shape(config))
        return mutils.State(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=optimizer.init(params), params_ema={}, model_state={},
                            rng=state_rng)

    return init


def abstract_state(config, sharding):
    shapes = jax.eval_shape(init_fn(config), jax.random.PRNGKey(config.seed))
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def perturb(sde, x, rng, t):
    """x(t) = mean(x, t) + std(t) z and std(t) [B]: what the classifier sees."""
    xt, _, std = sde.perturb(x, t, jax.random.normal(rng, x.shape, x.dtype))
    return xt, std


def programs(config, sde, mesh):
    """The jitted train step and eval step (correct predictions at one time t)."""
    classifier = mutils.create_classifier_module(config)
    optimizer = get_optimizer(config)
    scaler = datasets.get_data_scaler(config)
    flip = bool(config.data.random_flip)
    smoothing = float(config.classifier.get("label_smoothing", 0.0))
    rep, batch = replicated(mesh), batch_sharded(mesh)

    def train_step(state, data):
        images, labels = data
        x = scaler(images.astype(jnp.float32) / 255.0)
        flip_rng, t_rng, z_rng = jax.random.split(jax.random.fold_in(state.rng, state.step), 3)
        if flip:
            flips = jax.random.bernoulli(flip_rng, 0.5, (x.shape[0], 1, 1, 1))
            x = jnp.where(flips, x[:, :, ::-1], x)
        t = jax.random.uniform(t_rng, (x.shape[0],), minval=T_EPS, maxval=sde.T)
        xt, std = perturb(sde, x, z_rng, t)

        def loss_fn(params):
            logits = logit_fn(config, classifier, params)(xt, std)
            return jnp.mean(cross_entropy(logits, labels, smoothing)), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        state = state.replace(step=state.step + 1, opt_state=opt_state,
                              params=optax.apply_updates(state.params, updates))
        return state, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}

    def correct(params, images, labels, t, rng):
        x = scaler(images.astype(jnp.float32) / 255.0)
        t = jnp.full((x.shape[0],), jnp.maximum(t, T_EPS), x.dtype)
        xt, std = perturb(sde, x, rng, t)
        logits = logit_fn(config, classifier, params)(xt, std)
        return jnp.sum(jnp.argmax(logits, -1) == labels)

    train_step = jax.jit(train_step, in_shardings=(rep, batch), out_shardings=(rep, rep),
                         donate_argnums=0)
    correct = jax.jit(correct, in_shardings=(rep, batch, batch, rep, rep), out_shardings=rep)
    return train_step, correct



def evaluate_accuracy(config, params, test, correct, sharding) -> dict[float, float]:
    """Accuracy on the first classifier.eval_batches test batches at each eval time; the noise
    is drawn from fixed keys, so values from different steps compare like with like."""
    c = config.classifier
    images, labels = test
    local_batch = c.batch_size // jax.process_count()
    n_batches = max(min(int(c.eval_batches), images.shape[0] // local_batch), 1)
    key = jax.random.PRNGKey(config.seed + 1)
    out = {}
    for t in c.eval_times:
        hits = 0
        for i in range(n_batches):
            part = slice(i * local_batch, (i + 1) * local_batch)
            hits += int(correct(params, to_global(images[part], sharding),
                                to_global(labels[part], sharding), jnp.float32(t),
                                jax.random.fold_in(key, i)))
        out[float(t)] = hits / (n_batches * local_batch * jax.process_count())
    return out
