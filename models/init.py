"""A network's parameters and the functions that apply it.

`init_model` creates the configured network and initializes it (the reference's return
order), `param_shapes` gives its parameter shapes without allocating them, `get_model_fn`
applies it with its variables bound and `get_score_fn` turns it into the `score_fn(x, t)`
that samplers, losses and likelihoods consume (the label conventions live in `score_model`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax

from models.from_config import create_model, dummy_inputs


class InitializedModel(NamedTuple):
    """init_model's result, in the reference's order."""

    model: Any  # the flax Module
    init_model_state: dict  # non-parameter collections (e.g. batch statistics); often {}
    initial_params: Any  # the "params" collection


def init_model(rng, config, compiler_options: dict | None = None) -> InitializedModel:
    """Creates the model of `config` (create_model) and initializes it.

    Returns (model, init_model_state, initial_params), the reference's order. Called with a
    concrete `rng`, the initializer is compiled with `compiler_options` (the build layer
    passes `backend.compiler_options()`); inside a traced program, with the caller's.
    """
    model = create_model(config)
    x, labels = dummy_inputs(config)
    params_rng, dropout_rng = jax.random.split(rng)
    # Jitted: op-by-op initialization of a deep network dispatches thousands of small
    # programs (minutes for NCSN++ on CPU); inside an outer jit this is simply inlined.
    init = jax.jit(lambda rngs, x, labels: model.init(rngs, x, labels, train=False))
    rngs = {"params": params_rng, "dropout": dropout_rng}
    if isinstance(rng, jax.core.Tracer):  # inside the caller's program, with its options
        variables = init(rngs, x, labels)
    else:
        variables = init.lower(rngs, x, labels).compile(compiler_options)(rngs, x, labels)
    variables = flax.core.unfreeze(variables)
    params = variables.pop("params")
    return InitializedModel(model, variables, params)


def param_shapes(config):
    """Parameter shapes of the configured model without allocating them (jax.eval_shape)."""
    model = create_model(config)
    x, labels = dummy_inputs(config)
    variables = jax.eval_shape(
        lambda: model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                           x, labels, train=False))
    return variables["params"]


def count_params(tree) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(tree)))


def get_model_fn(model, params, states, train: bool = False):
    """Returns model_fn(x, labels, rng=None) -> (output, new_states).

    In training mode dropout draws from `rng` and mutable collections in `states` are
    updated; in evaluation mode `states` are returned unchanged.
    """

    def model_fn(x, labels, rng=None):
        variables = {"params": params, **states}
        if not train:
            return model.apply(variables, x, labels, train=False), states
        rngs = {"dropout": rng} if rng is not None else {}
        mutable = list(states.keys())
        if not mutable:
            return model.apply(variables, x, labels, train=True, rngs=rngs), states
        output, new_states = model.apply(variables, x, labels, train=True, rngs=rngs,
                                         mutable=mutable)
        return output, new_states

    return model_fn


def get_score_fn(sde, model, params, states, train: bool = False, continuous: bool = False,
                 return_state: bool = False):
    """The reference's signature: score_fn(x [B, ...], t [B], rng=None) -> score [B, ...] of
    `model` under `sde`'s label convention (`score_model.for_sde`; with `return_state`,
    (score, new_states))."""
    import score_model  # here: score_model imports models.utils, which imports this module

    return score_model.for_sde(sde, model, continuous).score_fn(params, states, train=train,
                                                                return_state=return_state)
