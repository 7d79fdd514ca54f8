"""Optimizer, score-matching objectives and the train / eval step.

Objectives (Song et al. 2021, Sec. 3.3 and App. C; yang-song/score_sde losses.py):
- continuous denoising score matching (Eq. 7) with weighting lambda(t) = std(t)^2, or the
  likelihood weighting lambda(t) = g(t)^2 (Song et al. 2021b);
- SMLD's discrete objective (VE) and DDPM's epsilon objective (VP), picked by the SDE's
  `discrete_objective`.

A loss function has the signature loss_fn(rng, params, states, batch) -> (loss, new_states)
with `batch` images [B, H, W, C] already scaled to the model's range.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

import score_model
from models import layerspp
from models import utils as mutils
from sde_lib import SDE, batch_mul

OPTIMIZERS = ("adam", "adamw")


LR_DECAYS = ("none", "cosine")


def adam(lr: float, warmup: int = 0, beta1: float = 0.9, eps: float = 1e-8,
         grad_clip: float = -1.0, weight_decay: float = 0.0, decay: str = "none",
         decay_steps: int = 0) -> optax.GradientTransformation:
    """Adam with the reference's linear warmup and optional global-norm clipping.

    lr_t = lr * min(t / warmup, 1), t the number of updates already made (yang-song/score_sde
    losses.optimization_manager). `decay='cosine'` (not in the reference) then anneals it to 0
    at update `decay_steps`: lr_t *= (1 + cos(pi (t - warmup) / (decay_steps - warmup))) / 2,
    and holds 0 after; short runs gain from ending at a small step size. A negative `grad_clip`
    disables clipping; `weight_decay` > 0 makes it AdamW (decoupled decay), which skips the
    fixed parameters (Fourier features): their zero gradients give zero Adam updates, but decay
    would still shrink them.
    """
    if decay not in LR_DECAYS:
        raise ValueError(f"Unknown learning-rate decay {decay!r}; valid choices: "
                         f"{list(LR_DECAYS)}.")
    warmup, decay_steps = int(warmup), int(decay_steps)
    if decay == "cosine" and decay_steps <= warmup:
        raise ValueError(f"A cosine decay needs decay_steps ({decay_steps}) > warmup ({warmup}).")

    def schedule(count):
        rate = lr * jnp.minimum(count / warmup, 1.0) if warmup > 0 else lr * jnp.ones_like(
            count, jnp.float32)
        if decay == "cosine":
            frac = jnp.clip((count - warmup) / (decay_steps - warmup), 0.0, 1.0)
            rate = rate * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
        return rate

    if warmup <= 0 and decay == "none":
        schedule = lr  # noqa: F811 -- a constant rate: the reference's optimizer state exactly
    if weight_decay > 0:
        opt = optax.adamw(schedule, b1=beta1, b2=0.999, eps=eps, weight_decay=weight_decay,
                          mask=layerspp.trainable_mask)
    else:
        opt = optax.adam(schedule, b1=beta1, b2=0.999, eps=eps)
    return optax.chain(optax.clip_by_global_norm(grad_clip), opt) if grad_clip >= 0 else opt


def get_optimizer(config) -> optax.GradientTransformation:
    """The score model's optimizer from config.optim.{optimizer, lr, beta1, eps, warmup,
    grad_clip, weight_decay, lr_decay} (the reference's config-taking entry point); a decay
    ends at config.training.n_iters."""
    optim = config.optim
    if optim.optimizer.lower() not in OPTIMIZERS:
        raise ValueError(f"Unknown optimizer {optim.optimizer!r}; valid names: ['Adam', 'AdamW'].")
    decay = optim.get("lr_decay", "none")
    return adam(optim.lr, warmup=optim.warmup, beta1=optim.beta1, eps=optim.eps,
                grad_clip=optim.grad_clip, weight_decay=float(optim.get("weight_decay", 0.0)),
                decay=decay, decay_steps=config.training.n_iters if decay != "none" else 0)


def _reduce(x, reduce_mean: bool):
    """Per-example reduction over all non-batch dims: mean, or half the sum."""
    x = x.reshape(x.shape[0], -1)
    return jnp.mean(x, axis=-1) if reduce_mean else 0.5 * jnp.sum(x, axis=-1)


TIME_DISTRIBUTIONS = ("uniform", "lognormal")


def sample_times(sde: SDE, rng, n: int, eps: float, distribution: str = "uniform",
                 p_mean: float = -1.2, p_std: float = 1.2):
    """Training times t [n] in [eps, T]: uniform (the paper, Eq. 7), or 'lognormal': EDM's
    noise distribution (Karras et al. 2022, Sec. 5), ln(sigma / alpha) ~ N(p_mean, p_std^2),
    mapped to t through the SDE's half log-SNR lambda = -ln(sigma / alpha) and clipped to the
    training range. 'lognormal' trains the middle noise levels, which decide what samples look
    like, more often than the ends (for VP, uniform t spends ~40% of the batch at t > 0.6,
    where sigma / alpha > 6)."""
    if distribution == "uniform":
        return jax.random.uniform(rng, (n,), minval=eps, maxval=sde.T)
    if distribution == "lognormal":
        log_s = p_mean + p_std * jax.random.normal(rng, (n,))
        return jnp.clip(sde.t_from_half_log_snr(-log_s), eps, sde.T)
    raise ValueError(f"time distribution {distribution!r}; valid: {TIME_DISTRIBUTIONS}")


def get_sde_loss_fn(sde: SDE, model, train: bool, reduce_mean: bool = True,
                    continuous: bool = True, likelihood_weighting: bool = True,
                    eps: float = 1e-5, parameterization: str = "eps", sigma_data: float = 0.5,
                    time_distribution: str = "uniform", p_mean: float = -1.2,
                    p_std: float = 1.2, edm_weight: bool = True):
    """Continuous-time denoising score matching, Eq. 7 (the reference's signature/defaults).

    With likelihood weighting (the default, as in the reference) the loss is
    ||s(x_t, t) + z / std||^2 g(t)^2; without it, ||std s(x_t, t) + z||^2 (lambda = std^2),
    times EDM's weight for `parameterization='edm'` unless `edm_weight=False`
    (`score_model.ScoreModel.loss_weight`: the loss of EDM's network output, uniform over noise
    levels). `time_distribution` draws t (`sample_times`).
    """
    scorer = score_model.for_sde(sde, model, continuous, parameterization=parameterization,
                                 sigma_data=sigma_data)

    def loss_fn(rng, params, states, batch):
        score_fn = scorer.score_fn(params, states, train=train, return_state=True)
        t_rng, z_rng, dropout_rng = jax.random.split(rng, 3)
        t = sample_times(sde, t_rng, batch.shape[0], eps, time_distribution, p_mean, p_std)
        z = jax.random.normal(z_rng, batch.shape)
        perturbed, _, std = sde.perturb(batch, t, z)
        score, new_states = score_fn(perturbed, t, dropout_rng)
        if likelihood_weighting:
            g2 = sde.sde(jnp.zeros_like(batch), t)[1] ** 2
            losses = _reduce(jnp.square(score + batch_mul(1.0 / std, z)), reduce_mean) * g2
        else:
            losses = _reduce(jnp.square(batch_mul(std, score) + z), reduce_mean)
            if edm_weight:
                losses = losses * scorer.loss_weight(t)
        return jnp.mean(losses), new_states

    return loss_fn


def get_smld_loss_fn(vesde, model, train: bool, reduce_mean: bool = False):
    """SMLD / NCSN objective: sum_i sigma_i^2 ||s(x + sigma_i z, i) + z / sigma_i||^2."""
    # Label i indexes noise levels from sigma_max down to sigma_min, as the NCSN models do.
    sigmas_desc = vesde.discrete_sigmas[::-1]

    def loss_fn(rng, params, states, batch):
        model_fn = mutils.get_model_fn(model, params, states, train=train)
        label_rng, z_rng, dropout_rng = jax.random.split(rng, 3)
        labels = jax.random.randint(label_rng, (batch.shape[0],), 0, vesde.N)
        sigmas = sigmas_desc[labels]
        noise = batch_mul(sigmas, jax.random.normal(z_rng, batch.shape))
        score, new_states = model_fn(batch + noise, labels, dropout_rng)
        target = -batch_mul(1.0 / sigmas**2, noise)
        losses = _reduce(jnp.square(score - target), reduce_mean) * sigmas**2
        return jnp.mean(losses), new_states

    return loss_fn


def get_ddpm_loss_fn(vpsde, model, train: bool, reduce_mean: bool = True):
    """DDPM objective ||eps_theta(sqrt(abar_i) x + sqrt(1 - abar_i) eps, i) - eps||^2."""
    sqrt_abar, sqrt_1m_abar = vpsde.sqrt_alphas_cumprod, vpsde.sqrt_1m_alphas_cumprod

    def loss_fn(rng, params, states, batch):
        model_fn = mutils.get_model_fn(model, params, states, train=train)
        label_rng, z_rng, dropout_rng = jax.random.split(rng, 3)
        labels = jax.random.randint(label_rng, (batch.shape[0],), 0, vpsde.N)
        noise = jax.random.normal(z_rng, batch.shape)
        perturbed = batch_mul(sqrt_abar[labels], batch) + batch_mul(sqrt_1m_abar[labels], noise)
        output, new_states = model_fn(perturbed, labels, dropout_rng)
        losses = _reduce(jnp.square(output - noise), reduce_mean)
        return jnp.mean(losses), new_states

    return loss_fn


_DISCRETE_LOSSES = {"smld": get_smld_loss_fn, "ddpm": get_ddpm_loss_fn}


def get_loss_fn(sde: SDE, model, train: bool, reduce_mean: bool = False,
                continuous: bool = True, likelihood_weighting: bool = False, **recipe):
    """The objective of `continuous` (Eq. 7) or the SDE's discrete one; `recipe`: the keyword
    arguments of `get_sde_loss_fn` beyond the reference's (parameterization, sigma_data,
    time_distribution, p_mean, p_std), continuous only."""
    if continuous:
        return get_sde_loss_fn(sde, model, train, reduce_mean=reduce_mean, continuous=True,
                               likelihood_weighting=likelihood_weighting, **recipe)
    if likelihood_weighting:
        raise ValueError("Likelihood weighting is only defined for continuous training.")
    objective = sde.discrete_objective
    if objective not in _DISCRETE_LOSSES:
        raise ValueError(
            f"Discrete training is not defined for {type(sde).__name__}; it is for SDEs with "
            f"a discrete_objective in {sorted(_DISCRETE_LOSSES)} (VESDE: 'smld', VPSDE: "
            "'ddpm'). Set config.training.continuous=True.")
    return _DISCRETE_LOSSES[objective](sde, model, train, reduce_mean=reduce_mean)


def ema_update(ema, new, rate: float):
    """ema <- rate * ema + (1 - rate) * new, leaf by leaf.

    Written as ema + (1 - rate)(new - ema), which leaves a parameter that never changes (the
    fixed Fourier features) exactly equal to itself instead of drifting by rounding.
    """
    return jax.tree_util.tree_map(lambda e, p: e + (1.0 - rate) * (p - e), ema, new)


def get_step_fn(sde: SDE, model, train: bool, optimizer=None, reduce_mean: bool = False,
                continuous: bool = True, likelihood_weighting: bool = False,
                ema_rate: float = 0.999, unroll: bool = False, **recipe):
    """Returns step_fn(state, batch) -> (state, losses) running one step per leading slice.

    `batch` is [n_steps, B, H, W, C]: the steps run sequentially inside one program (a
    `lax.scan`, or with `unroll` one copy of the step per slice: the build layer passes
    `backend.unroll_steps()`, True on XLA:CPU), so n_jitted_steps steps cost one dispatch.
    Each step's randomness is fold_in(state.rng, state.step), so a resumed run repeats an
    uninterrupted one exactly.
    Training applies `optimizer` (an optax transformation) and updates the EMA of the
    parameters; evaluation computes the loss of `params_ema` and leaves the state unchanged.
    Means over the batch are global, also when the batch is sharded across devices.
    """
    if train and optimizer is None:
        raise ValueError("A training step needs an optimizer.")
    loss_fn = get_loss_fn(sde, model, train, reduce_mean=reduce_mean, continuous=continuous,
                          likelihood_weighting=likelihood_weighting, **recipe)

    def one_step(state, batch):
        rng = jax.random.fold_in(state.rng, state.step)
        if not train:
            loss, _ = loss_fn(rng, state.params_ema, state.model_state, batch)
            return state, loss
        grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)
        (loss, new_model_state), grads = grad_fn(rng, state.params, state.model_state, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              params_ema=ema_update(state.params_ema, params, ema_rate),
                              model_state=new_model_state)
        return state, loss

    def step_fn(state, batch):
        if not unroll:
            return jax.lax.scan(one_step, state, batch)
        # Unrolled: the step is traced once, as a nested jit that every copy calls, and XLA
        # inlines the calls before optimizing, so the program is the straight-line one; only
        # the Python tracing of the n copies (seconds each for NCSN++) is saved.
        step = jax.jit(one_step)
        step_losses = []
        for i in range(batch.shape[0]):
            state, loss = step(state, batch[i])
            step_losses.append(loss)
        return state, jnp.stack(step_losses)

    return step_fn


def init_train_state(rng, config, model=None, params=None, states=None):
    """Initial State for `config` (model built from the registry unless given).

    Returns (model, state, optimizer).
    """
    init_rng, step_rng = jax.random.split(rng)
    if model is None:
        model, states, params = mutils.init_model(init_rng, config)
    optimizer = get_optimizer(config)
    state = mutils.State(step=jnp.asarray(0, jnp.int32), params=params,
                         opt_state=optimizer.init(params), params_ema=params,
                         model_state=states, rng=step_rng)
    return model, state, optimizer
