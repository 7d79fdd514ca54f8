"""The jitted, sharded programs a run executes: train step, eval loss, sampler."""

from __future__ import annotations

import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import backend
import datasets
import losses
import ode
import sampling
import sde_lib
from models import utils as mutils
from run_lib import logs
from run_lib.devices import batch_sharded, replicated
from run_lib.interrupt import Interrupted, interrupted

# A sampling loop (sampling.LoopParts) runs as at most this many calls of one compiled program:
# between them a long batch logs its progress (at most every PROGRESS_SECONDS) and Ctrl-C is
# honoured, at the cost of one dispatch and one wait per call (micro- to milliseconds against
# seconds or minutes of sampling).
LOOP_CALLS = 20
PROGRESS_SECONDS = 10.0


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
    sc = config.sampling
    if sc.method == "pc":
        # Algorithm 1 in parts: progress lines and Ctrl-C within a long batch.
        def parts_of(batch):
            return sampling.get_pc_loop_parts(
                sde, (batch, *shape[1:]), sc.predictor, sc.corrector, inverse_scaler, sc.snr,
                sc.n_steps_each, sc.probability_flow, sc.noise_removal, sde.sampling_eps)

        program = LoopProgram(
            parts_of, lambda params, model_state: get_score_fn(config, sde, model, params,
                                                               model_state, any_time=False),
            mesh, f"the PC sampler ({sc.predictor} + {sc.corrector})")
        nfe = parts_of(shape[0]).nfe

        def sample_in_parts(rng, params, model_state):
            return program(rng, shape[0], (params, model_state)), nfe

        return sample_in_parts
    sampler = sampling.get_sampling_fn(config, sde, shape, inverse_scaler, sde.sampling_eps)

    def sample(rng, params, model_state):
        return sampler(rng, get_score_fn(config, sde, model, params, model_state, True))

    if sc.method == "ode" and ode.is_host_method(sc.ode_method):
        return backend.tuned(sample)
    # backend.jit: traced with the backend's formulations and compiled with its options.
    return logs.CompiledOnFirstCall(
        backend.jit(sample, out_shardings=(batch_sharded(mesh), replicated(mesh))),
        f"the {sc.method} sampler (batch {shape[0]})")


class LoopProgram:
    """Runs a sampler given as `sampling.LoopParts` in at most LOOP_CALLS calls of one compiled
    program (per batch size), logging progress and honouring Ctrl-C between calls.

    program(rng, batch, score_args, inputs=()) -> samples [batch, ...] (batch-sharded): with
    parts = parts_of(batch), init(rng, *inputs), the loop with score_fn = score_of(*score_args)
    (traced: parameters are arguments, not constants), then finish.
    """

    def __init__(self, parts_of, score_of, mesh, what: str, calls: int = LOOP_CALLS):
        self.parts_of, self.score_of, self.mesh, self.what = parts_of, score_of, mesh, what
        self.calls, self._programs = calls, {}

    def _build(self, parts, rng, inputs, batch):
        mesh = self.mesh
        carry = jax.eval_shape(parts.init, rng, *inputs)
        # The sample and what it keeps are split over the batch; the key (uint32 [2] or a typed
        # key) is replicated.
        shardings = jax.tree_util.tree_map(
            lambda x: batch_sharded(mesh) if x.ndim >= 1 and x.shape[0] == batch
            and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key) and x.dtype != jnp.uint32
            else replicated(mesh), carry)
        init = jax.jit(parts.init, out_shardings=shardings)

        def advance(carry, start, stop, *score_args):
            return parts.advance(carry, self.score_of(*score_args), start, stop)

        advance = logs.CompiledOnFirstCall(
            backend.jit(advance, out_shardings=shardings, donate_argnums=0),
            f"{self.what} ({parts.num_steps} steps, batch {batch})")
        finish = jax.jit(parts.finish, out_shardings=batch_sharded(mesh))
        return init, advance, finish

    def __call__(self, rng, batch: int, score_args, inputs=()):
        key = (batch, *((np.shape(x), str(getattr(x, "dtype", ""))) for x in (rng, *inputs)))
        if key not in self._programs:
            parts = self.parts_of(batch)
            self._programs[key] = (parts, *self._build(parts, rng, inputs, batch))
        parts, init, advance, finish = self._programs[key]
        n = parts.num_steps
        bounds = np.unique(np.linspace(0, n, min(self.calls, n) + 1).round().astype(np.int32))
        carry = init(rng, *inputs)
        advance.compile(carry, np.int32(0), np.int32(n), *score_args)
        t0 = last = time.time()
        for k, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if k and interrupted():
                raise Interrupted(f"Interrupted at step {start} of {n} of {self.what}")
            carry = advance(carry, np.int32(start), np.int32(stop), *score_args)
            jax.block_until_ready(carry)
            now = time.time()
            if now - last >= PROGRESS_SECONDS and stop < n:
                eta = (now - t0) / stop * (n - stop)
                logging.info("%s: step %d/%d, %.0f s, ETA %s", self.what, stop, n, now - t0,
                             logs.fmt_eta(eta))
                last = now
        return finish(carry)


def stream(key, name: str):
    """An independent key for one purpose of a run (snapshot samples, eval rounds, ...).

    fold_in(key, crc32(name)): named rather than numbered, so that adding a purpose never
    shifts the randomness of another, and readable at the call site.
    """
    return jax.random.fold_in(key, zlib.crc32(name.encode()) & 0x7FFFFFFF)
