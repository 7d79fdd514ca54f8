"""The one place where a config becomes objects: the SDE, the network, the score model, the
optimizer, the datasets and scalers, the train and eval steps, the samplers and the bits/dim
program. Everything past this module takes typed arguments; the programs are jitted on the
device mesh by `run_lib.steps.program`.

    sde, model = build(config)
    train_step, eval_losses = build_step_fns(config, sde, model, optimizer(config), mesh)
    sample = get_sample_fn(config, sde, model, shape, mesh)     # (rng, params, model_state)
    bpd = get_bpd_fn(config, sde, model, mesh)                   # (rng, params, model_state, x)
"""

from __future__ import annotations

import jax

import backend
import datasets
import likelihood
import losses
import ode
import sampling
import score_model
import sde_lib
from models import utils as mutils
from run_lib import steps
from run_lib.devices import batch_sharded, replicated


def build(config):
    """(sde, model) of a config: `sde_lib.get_sde` and `models.utils.create_model`."""
    return sde_lib.get_sde(config), mutils.create_model(config)


def optimizer(config):
    """The optax optimizer of config.optim (`losses.get_optimizer`)."""
    return losses.get_optimizer(config)


def dataset(config, **kwargs):
    """(train, eval, builder) of config.data (`datasets.get_dataset`)."""
    return datasets.get_dataset(config, **kwargs)


def scalers(config):
    """(scaler, inverse_scaler): [0, 1] images to the model's space and back."""
    return datasets.get_data_scaler(config), datasets.get_data_inverse_scaler(config)


def get_score_fn(config, sde, model, params, model_state, any_time: bool):
    """The EMA network as a score function for sampling or likelihoods.

    `any_time=False` (PC samplers) follows the training objective's labels; `any_time=True` (the
    probability-flow ODE, likelihoods and every other sampler, which evaluate the score at
    arbitrary times) uses continuous-time labels whatever the objective, as the reference does
    (yang-song/score_sde sampling.get_ode_sampler, likelihood.get_likelihood_fn): this is what
    the paper's bits/dim protocol measures for the discrete DDPM models too.
    """
    continuous = bool(config.training.continuous) or any_time
    return score_model.for_sde(sde, model, continuous, **score_kwargs(config)).score_fn(
        params, model_state)


def score_kwargs(config) -> dict:
    """`score_model.for_sde`'s keyword arguments from config.model (the output convention)."""
    return dict(parameterization=config.model.get("parameterization", "eps"),
                sigma_data=float(config.model.get("sigma_data", 0.5)))


def loss_recipe(config) -> dict:
    """`losses.get_sde_loss_fn`'s keyword arguments beyond the reference's, from the config:
    the output convention and the distribution of training times; {} when all are the paper's
    (so the discrete objectives, which take none, stay reachable)."""
    tc = config.training
    recipe = dict(score_kwargs(config), time_distribution=tc.get("time_distribution", "uniform"),
                  p_mean=float(tc.get("p_mean", -1.2)), p_std=float(tc.get("p_std", 1.2)),
                  edm_weight=bool(tc.get("edm_weight", True)))
    if recipe["parameterization"] == "eps" and recipe["time_distribution"] == "uniform":
        return {}
    return recipe


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
                  likelihood_weighting=tc.likelihood_weighting, **loss_recipe(config))
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


def pc_program(config, sde, model, mesh, image_shape, what: str,
               make_parts=sampling.get_pc_loop_parts, score_of=None) -> steps.LoopProgram:
    """The PC sampler of config.sampling (`sampling.pc_settings`, the SDE's sampling eps) as a
    `steps.LoopProgram` (rng, batch, score_args, inputs) -> images [batch, *image_shape].

    make_parts(sde, shape, inverse_scaler=..., eps=..., **pc_settings) -> LoopParts: Algorithm 1
    by default, or a controllable generation sampler's parts. score_of(*score_args) -> score_fn:
    by default the network of (params, model_state) under the training objective's labels.
    """
    inverse_scaler, settings = datasets.get_data_inverse_scaler(config), \
        sampling.pc_settings(config)

    def parts_of(batch):
        return make_parts(sde, (batch, *image_shape), inverse_scaler=inverse_scaler,
                          eps=sde.sampling_eps, **settings)

    def network_score(params, model_state):
        return get_score_fn(config, sde, model, params, model_state, any_time=False)

    return steps.LoopProgram(parts_of, score_of or network_score, mesh, what)


def get_sample_fn(config, sde, model, shape, mesh, score_of=None, what: str = ""):
    """Returns sample(rng, *score_args) -> (images in [0, 1] sharded over the batch, nfe).

    Uses the sampler `config.sampling` names; jitted on the mesh unless it integrates on the
    host (a scipy ODE method). score_args: (params, model_state) of the network by default;
    with `score_of(*score_args, any_time=...) -> score_fn`, whatever score that builds (e.g.
    the classifier-guided score of --mode=conditional), its arguments traced, not baked in, and
    kept with the shardings they come with. `what` names the program in the compile log line.
    """
    sc = config.sampling
    custom = score_of is not None
    if not custom:
        def score_of(params, model_state, any_time):
            return get_score_fn(config, sde, model, params, model_state, any_time=any_time)
    if sc.method == "pc":
        # Algorithm 1 in parts: progress lines and Ctrl-C within a long batch.
        program = pc_program(config, sde, model, mesh, tuple(shape[1:]),
                             what or f"the PC sampler ({sc.predictor} + {sc.corrector})",
                             score_of=lambda *args: score_of(*args, any_time=False))
        nfe = program.parts_of(shape[0]).nfe
        return lambda rng, *score_args: (program(rng, shape[0], score_args), nfe)
    sampler = sampling.get_sampling_fn(config, sde, shape, datasets.get_data_inverse_scaler(config),
                                       sde.sampling_eps)

    def sample(rng, *score_args):
        return sampler(rng, score_of(*score_args, any_time=True))

    return steps.program(sample, mesh, what or f"the {sc.method} sampler (batch {shape[0]})",
                         batch_args=None if custom else 0, out=("batch", "replicated"),
                         host=sc.method == "ode" and ode.is_host_method(sc.ode_method))


def get_likelihood_fn(config, sde, model, mesh, what: str, eps: float = 1e-5, latents=False):
    """likelihood(rng, params, model_state, x [B, H, W, C] in model space) -> bpd [B] (with
    `latents`: (bpd [B], z [B, H, W, C])) through the probability-flow ODE of config.sampling's
    ode_method / ode_rtol / ode_atol, integrated from `eps` (App. D.2)."""
    sc = config.sampling
    likelihood_fn = likelihood.get_likelihood_fn(
        sde, datasets.get_data_inverse_scaler(config), rtol=sc.ode_rtol, atol=sc.ode_atol,
        method=sc.ode_method, eps=eps)

    def fn(rng, params, model_state, x):
        score_fn = get_score_fn(config, sde, model, params, model_state, any_time=True)
        bpd, z, _ = likelihood_fn(rng, score_fn, x)
        return (bpd, z) if latents else bpd

    return steps.program(fn, mesh, what, batch_args=1,
                         out=("batch", "batch") if latents else "batch",
                         host=ode.is_host_method(sc.ode_method))


def get_bpd_fn(config, sde, model, mesh):
    """The bits/dim program of --mode=eval and --mode=likelihood: bpd(rng, params, model_state,
    x [B, H, W, C] uniformly dequantized, in model space) -> bits/dim [B] (App. D.2)."""
    return get_likelihood_fn(config, sde, model, mesh,
                             f"the probability-flow ODE of bits/dim ({config.sampling.ode_method})")
