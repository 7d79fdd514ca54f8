"""The jitted, sharded programs a run executes: train step, eval loss, sampler."""

from __future__ import annotations

import zlib

import jax

import backend
import datasets
import losses
import ode
import sampling
import sde_lib
from models import utils as mutils
from run_lib.devices import batch_sharded, replicated


def build(config):
    """(sde, model) of a config."""
    return sde_lib.get_sde(config), mutils.create_model(config)


def get_score_fn(config, sde, model, params, model_state, any_time: bool):
    """The EMA network as a score function for sampling or likelihoods.

    `any_time=False` (PC samplers) follows the training objective's labels; `any_time=True` (the
    probability-flow ODE, likelihoods and every other sampler, which evaluate the score at
    arbitrary times) uses continuous-time labels whatever the objective, as the reference does
    (yang-song/score_sde sampling.get_ode_sampler, likelihood.get_likelihood_fn): this is what
    the paper's bits/dim protocol measures for the discrete DDPM models too.
    """
    continuous = bool(config.training.continuous) or any_time
    return mutils.get_score_fn(sde, model, params, model_state, train=False,
                               continuous=continuous)


def build_step_fns(config, sde, model, optimizer, mesh):
    """The jitted, sharded train step and eval-loss function on `mesh`.

    train_step(state, batch [n, B, H, W, C]) -> (state, losses [n]) with the state replicated
    and donated, the batch split over the mesh; eval_losses(state, batch, index) -> losses [n],
    where `index` (e.g. the eval batch number) is folded into the noise key so that every eval
    batch draws its own t and z. Without an optimizer train_step is None.
    """
    rep, batches = replicated(mesh), batch_sharded(mesh, leading_axes=1)
    tc = config.training
    kwargs = dict(reduce_mean=tc.reduce_mean, continuous=tc.continuous,
                  likelihood_weighting=tc.likelihood_weighting)
    # backend.jit: traced with the backend's formulations and compiled with its options.
    train_step = None if optimizer is None else backend.jit(
        losses.get_step_fn(sde, model, True, optimizer, ema_rate=config.model.ema_rate,
                           unroll=backend.unroll_steps(), **kwargs),
        in_shardings=(rep, batches), out_shardings=(rep, rep), donate_argnums=0)
    eval_step = losses.get_step_fn(sde, model, False, unroll=backend.unroll_steps(), **kwargs)

    def eval_losses(state, batch, index):
        state = state.replace(rng=jax.random.fold_in(state.rng, index))
        return eval_step(state, batch)[1]

    eval_losses = jax.jit(backend.tuned(eval_losses), in_shardings=(rep, batches, rep),
                          out_shardings=rep)
    return train_step, eval_losses


def get_sample_fn(config, sde, model, shape, mesh):
    """Returns sample(rng, params, model_state) -> (images in [0, 1] sharded over the batch, nfe).

    Uses the sampler `config.sampling` names; jitted on the mesh unless it integrates on the
    host (a scipy ODE method).
    """
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    sampler = sampling.get_sampling_fn(config, sde, shape, inverse_scaler, sde.sampling_eps)
    any_time = config.sampling.method != "pc"

    def sample(rng, params, model_state):
        return sampler(rng, get_score_fn(config, sde, model, params, model_state, any_time))

    if config.sampling.method == "ode" and ode.is_host_method(config.sampling.ode_method):
        return backend.tuned(sample)
    return backend.jit(sample, out_shardings=(batch_sharded(mesh), replicated(mesh)))


def stream(key, name: str):
    """An independent key for one purpose of a run (snapshot samples, eval rounds, ...).

    fold_in(key, crc32(name)): named rather than numbered, so that adding a purpose never
    shifts the randomness of another, and readable at the call site.
    """
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
