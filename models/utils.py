"""Model registry, construction from a config, initialization, the train State, and wrapping
networks as score functions.

A score model is a flax.linen Module with typed fields (for example
`NCSNpp(nf=128, ch_mult=(1, 2, 2, 2), ...)`) applied as
`model.apply(variables, x [B, H, W, C], labels [B], train=bool)`. `create_model(config)` is the
one place that reads a config for a network: it fills the registered module's fields by name.
`get_score_fn` turns a network into the `score_fn(x, t)` that samplers, losses and likelihoods
consume, following the label conventions of the paper (they live in `score_model`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
from typing import Any, NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

import sde_lib

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

    Returns float64 [num_scales]: `sde_lib.VESDE.discrete_sigmas` in descending order, so
    index i = round((T - t)(N - 1)), the VE discrete label, gives sigma_max at i = 0.
    """
    m = config.model
    return sde_lib.ve_discrete_sigmas(m.sigma_min, m.sigma_max, m.num_scales)[::-1]


# Config keys a model field is read from, in order, when it is not config.model.<field>.
_FIELD_KEYS = {
    "centered": ("data.centered",),
    "image_size": ("data.image_size",),
    "num_channels": ("data.num_channels",),
    "num_outputs": ("model.num_outputs", "model.num_classes"),
    # Compute settings of a run, read by the networks that implement them.
    "precision": ("training.precision",),
    "remat": ("training.remat",),
}

# Fields computed from several config keys: name -> (keys, function of the config).
_DERIVED_FIELDS = {
    # The VE noise levels, descending (index = discrete VE label), for scale_by_sigma.
    "sigmas": (("model.sigma_min", "model.sigma_max", "model.num_scales"),
               lambda config: tuple(float(s) for s in get_sigmas(config))),
}

_MISSING = object()


def _lookup(config, key: str):
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return _MISSING
        node = node[part]
    return node


def _hashable(value):
    # Module fields must be hashable; ConfigDicts hold sequences as lists.
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    return value


def _field_value(config, name: str):
    """(value or _MISSING, the config keys tried) for the model field `name`."""
    if name in _DERIVED_FIELDS:
        keys, derive = _DERIVED_FIELDS[name]
        found = all(_lookup(config, k) is not _MISSING for k in keys)
        return (derive(config) if found else _MISSING), keys
    keys = _FIELD_KEYS.get(name, (f"model.{name}",))
    for key in keys:
        value = _lookup(config, key)
        if value is not _MISSING:
            return _hashable(value), keys
    return _MISSING, keys


def model_kwargs(config) -> dict[str, Any]:
    """The field values `create_model` passes to the model named by config.model.name.

    Every init field of the registered module is read by name from config.model (a few from
    config.data, see _FIELD_KEYS) or derived (`sigmas`, the VE noise levels); a field the
    config does not give keeps its default, and a required one raises ValueError naming the
    model, the field and the keys tried.
    """
    name = config.model.name
    cls = get_model(name)
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name in ("parent", "name") or not field.init:
            continue  # flax's own fields; config.model.name is the registry name
        value, keys = _field_value(config, field.name)
        if value is not _MISSING:
            kwargs[field.name] = value
        elif field.default is dataclasses.MISSING and \
                field.default_factory is dataclasses.MISSING:
            raise ValueError(f"Model {name!r} ({cls.__name__}) needs field {field.name!r}, "
                             f"but the config has none of {list(keys)}.")
    _check_consistency(name, cls, kwargs, config)
    _check_run_settings(name, cls, config)
    return kwargs


# Run settings (config.training) that only some networks implement, and their neutral values.
_RUN_SETTINGS = {"precision": "float32", "remat": False}


def _check_run_settings(name: str, cls, config) -> None:
    """Refuses a non-default precision / remat for a network that would silently ignore it."""
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, neutral in _RUN_SETTINGS.items():
        value = _lookup(config, f"training.{key}")
        if value is not _MISSING and value != neutral and key not in fields:
            having = sorted(n for n, c in _MODELS.items()
                            if key in {f.name for f in dataclasses.fields(c)})
            raise ValueError(f"config.training.{key}={value!r} is not implemented by model "
                             f"{name!r}; models that implement it: {having}. Use "
                             f"{neutral!r}.")


def _check_consistency(name: str, cls, kwargs: dict, config) -> None:
    """Refuses config keys that would otherwise be silently ignored or contradicted."""
    fields = {f.name for f in dataclasses.fields(cls)}
    num_classes = _lookup(config, "model.num_classes")
    # NCSN-style networks have one noise-level embedding row per level (num_scales); the
    # reference's separate num_classes key would give labels >= num_classes NaN rows.
    if ("num_scales" in fields and "num_classes" not in fields and
            num_classes is not _MISSING and num_classes != kwargs.get("num_scales")):
        raise ValueError(
            f"Model {name!r} has one noise-level embedding per noise level, "
            f"config.model.num_scales={kwargs.get('num_scales')}, but config.model.num_classes="
            f"{num_classes} differs; remove num_classes or set it to num_scales.")
    continuous = _lookup(config, "training.continuous")
    if (str(kwargs.get("embedding_type", "")).lower() == "fourier" and
            continuous is not _MISSING and not continuous):
        raise ValueError(
            f"Model {name!r} with embedding_type='fourier' takes noise levels sigma as labels, "
            "which only continuous training gives it (config.training.continuous=False); use "
            "embedding_type='positional' for discrete training.")


def create_model(config):
    """The flax Module named by config.model.name, its fields filled from the config."""
    return get_model(config.model.name)(**model_kwargs(config))


def _dummy_inputs(config, batch_size: int = 1):
    shape = (batch_size, config.data.image_size, config.data.image_size,
             config.data.num_channels)
    return jnp.zeros(shape, jnp.float32), jnp.ones((batch_size,), jnp.float32)


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
    x, labels = _dummy_inputs(config)
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
    """The reference's signature: score_fn(x [B, ...], t [B], rng=None) -> score [B, ...] of
    `model` under `sde`'s label convention (`score_model.for_sde`; with `return_state`,
    (score, new_states))."""
    import score_model  # here: score_model imports this module

    return score_model.for_sde(sde, model, continuous).score_fn(params, states, train=train,
                                                                return_state=return_state)


@flax.struct.dataclass
class State:
    """Everything a training run changes; constants stay in the config."""

    step: Any
    params: Any
    opt_state: Any
    params_ema: Any
    model_state: Any
    rng: Any


# ---------------------------------------------------------------------------- classifiers

def _wide_resnet(blocks_per_group, channel_multiplier, num_outputs):
    # Imported here: that module registers itself with this one (an import cycle at the top).
    from models.wideresnet_noise_conditional import WideResnet

    return WideResnet(blocks_per_group=int(blocks_per_group),
                      channel_multiplier=int(channel_multiplier), num_outputs=int(num_outputs))


def create_classifier_module(config):
    """The noise-conditional WideResnet of `config.classifier` (App. I.1).

    Applied as `classifier.apply({'params': p}, x [B, H, W, C], noise_scale [B], train=False)`
    -> logits [B, num_classes], noise_scale = std(t) of the SDE's perturbation kernel. Its
    parameter tree has no prefix, as the reference's classifier checkpoint.
    """
    c = config.classifier
    return _wide_resnet(c.blocks_per_group, c.channel_multiplier, c.num_classes)


def init_classifier_params(classifier, rng, image_shape):
    """Initial parameters of a classifier for images [H, W, C] (jitted, as `init_model`)."""
    x = jnp.ones((1, *image_shape), jnp.float32)
    init = jax.jit(lambda rng: classifier.init({"params": rng, "dropout": jax.random.PRNGKey(0)},
                                               x, jnp.ones((1,), jnp.float32), train=False))
    return flax.core.unfreeze(init(rng))["params"]


def _shapes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(np.shape(v))
            for path, v in leaves}


def _newest_classifier_step(folder: str) -> str | None:
    """The newest checkpoint_<k> of a classifier folder (`<folder>/checkpoints/`) or None."""
    for parent in (os.path.join(folder, "checkpoints"), folder):
        if not os.path.isdir(parent):
            continue
        steps = [int(m.group(1)) for m in (re.fullmatch(r"checkpoint_(\d+)", n)
                                           for n in os.listdir(parent)) if m]
        if steps:
            return os.path.join(parent, f"checkpoint_{max(steps)}")
    return None


def load_classifier_params(path: str, init_params):
    """Classifier parameters from `path`, checked against the shapes of `init_params`.

    `path`: a classifier folder written by `--mode=train_classifier` (`<workdir>/classifier`,
    its newest checkpoint), one of its `checkpoint_<k>` folders, or a flax msgpack file of the
    parameters (what the reference's `checkpoints.restore_checkpoint` reads). Raises
    FileNotFoundError, or ValueError naming the first parameter whose shape differs.
    """
    if os.path.isfile(path):
        with open(path, "rb") as f:
            try:
                raw = flax.serialization.msgpack_restore(f.read())
            except Exception as e:  # noqa: BLE001 (msgpack raises many types on bad bytes)
                raise ValueError(f"{path}: not a flax msgpack checkpoint ({e}).") from None
        raw = raw.get("params", raw) if isinstance(raw, dict) else raw
    else:
        folder = path if os.path.isdir(os.path.join(path, "default")) else \
            _newest_classifier_step(path)
        if folder is None:
            raise FileNotFoundError(f"{path}: no classifier checkpoint (checkpoint_<k>) there.")
        # Orbax takes over a second to import; only this branch needs it.
        import orbax.checkpoint as ocp

        raw = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(folder),
                                                              "default"))["params"]
    have, want = _shapes(raw), _shapes(init_params)
    for name in sorted(set(have) | set(want)):
        if have.get(name) != want.get(name):
            raise ValueError(
                f"{path} does not match the classifier's config: parameter {name!r} has shape "
                f"{have.get(name, 'absent')} in the checkpoint but {want.get(name, 'absent')} "
                "in the config (config.classifier.blocks_per_group, channel_multiplier, "
                "num_classes and the image size).")
    return jax.tree_util.tree_map(jnp.asarray, flax.serialization.from_state_dict(init_params,
                                                                                  raw))


def create_classifier(prng_key, batch_size, ckpt_path, blocks_per_group: int = 4,
                      channel_multiplier: int = 10, num_outputs: int = 10,
                      image_shape=(32, 32, 3)):
    """The reference's helper (yang-song/score_sde models/utils.create_classifier): a
    noise-conditional WideResnet and its parameters restored from `ckpt_path`.

    By default WRN-28-10 for 32 x 32 x 3 images, as the reference; `ckpt_path` may be the
    reference's flax msgpack file or a classifier folder of this project (see
    `load_classifier_params`), whose `config.json` then gives the sizes.
    Returns (classifier, classifier_params). `batch_size` is kept for compatibility.
    """
    del batch_size  # shapes do not depend on it
    saved = os.path.join(ckpt_path, "config.json")
    if os.path.isdir(ckpt_path) and os.path.isfile(saved):
        with open(saved) as f:
            config = json.load(f)
        c, data = config["classifier"], config["data"]
        blocks_per_group, channel_multiplier = c["blocks_per_group"], c["channel_multiplier"]
        num_outputs = c["num_classes"]
        image_shape = (data["image_size"], data["image_size"], data["num_channels"])
    classifier = _wide_resnet(blocks_per_group, channel_multiplier, num_outputs)
    init_params = init_classifier_params(classifier, prng_key, tuple(image_shape))
    return classifier, load_classifier_params(ckpt_path, init_params)
