"""Model registry, initialization, the train State, and wrapping networks as score functions.

A score model is a flax.linen Module constructed as `Model(config=config)` and applied as
`model.apply(variables, x [B, H, W, C], labels [B], train=bool)`. `get_score_fn` turns it
into the `score_fn(x, t)` that samplers, losses and likelihoods consume, following the
label conventions of the paper (they live on the SDE classes; see `sde_lib`).
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

_MODELS: dict[str, type] = {}


def register_model(cls=None, *, name: str | None = None):
    """Class decorator registering a model under `name` (default: the class name)."""

    def _register(cls):
        local_name = cls.__name__ if name is None else name
        if local_name in _MODELS and _MODELS[local_name] is not cls:
            raise ValueError(f"A model is already registered under the name {local_name!r}.")
        _MODELS[local_name] = cls
        return cls

    return _register if cls is None else _register(cls)


def _import_builtin_models():
    # Importing the model modules runs their @register_model decorators. Done lazily so that
    # importing this module stays cheap and free of import cycles.
    import importlib

    for module in ("ncsnpp", "ddpm", "ncsnv2", "wideresnet_noise_conditional"):
        try:
            importlib.import_module(f"models.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"models.{module}":
                raise


def registered_models() -> list[str]:
    _import_builtin_models()
    return sorted(_MODELS)


def get_model(name: str):
    """Returns the model class registered under `name`."""
    _import_builtin_models()
    if name not in _MODELS:
        raise ValueError(f"Unknown model {name!r}; valid names: {sorted(_MODELS)}.")
    return _MODELS[name]


def get_sigmas(config) -> np.ndarray:
    """Noise levels of the discrete VE chain, geometric from sigma_max down to sigma_min.

    Returns [num_scales]; index i = round((T - t)(N - 1)) is the VE discrete label, so
    index 0 is sigma_max.
    """
    return np.exp(np.linspace(np.log(config.model.sigma_max), np.log(config.model.sigma_min),
                              config.model.num_scales))


def _dummy_inputs(config, batch_size: int = 1):
    shape = (batch_size, config.data.image_size, config.data.image_size,
             config.data.num_channels)
    return jnp.zeros(shape, jnp.float32), jnp.ones((batch_size,), jnp.float32)


def init_model(rng, config):
    """Creates the model named by `config.model.name` and initializes it.

    Returns (model, params, states): `states` holds every non-parameter variable collection
    (for example batch statistics); it is an empty dict for most score models.
    """
    model = get_model(config.model.name)(config=config)
    x, labels = _dummy_inputs(config)
    params_rng, dropout_rng = jax.random.split(rng)
    # Jitted: op-by-op initialization of a deep network dispatches thousands of small
    # programs (minutes for NCSN++ on CPU); inside an outer jit this is simply inlined.
    init = jax.jit(lambda rngs, x, labels: model.init(rngs, x, labels, train=False))
    variables = init({"params": params_rng, "dropout": dropout_rng}, x, labels)
    variables = flax.core.unfreeze(variables)
    params = variables.pop("params")
    return model, params, variables


def param_shapes(config):
    """Parameter shapes of the configured model without allocating them (jax.eval_shape)."""
    model = get_model(config.model.name)(config=config)
    x, labels = _dummy_inputs(config)
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
    """Wraps a score network as score_fn(x [B, ...], t [B], rng=None) -> score [B, ...].

    Labels and output scaling come from the SDE (VE continuous: sigma(t), output is the
    score; VP / sub-VP continuous: 999 t, score = -output / std(t); discrete: timestep
    indices). With `return_state`, returns (score, new_states) instead.
    """
    model_fn = get_model_fn(model, params, states, train=train)

    def score_fn(x, t, rng=None):
        labels = sde.model_labels(t, continuous)
        output, new_states = model_fn(x, labels, rng)
        score = sde.output_to_score(output, t, continuous)
        return (score, new_states) if return_state else score

    return score_fn


@flax.struct.dataclass
class State:
    """Everything a training run changes; constants stay in the config."""

    step: Any
    params: Any
    opt_state: Any
    params_ema: Any
    model_state: Any
    rng: Any
