"""A network from a config: the one place that reads a config for a model.

`create_model(config)` fills the init fields of the module registered under
`config.model.name` by name from `config.model` (a few from `config.data` and
`config.training`, see `_FIELD_KEYS`) or derives them (`sigmas`, the VE noise levels), and
refuses config keys the network would silently ignore or contradict.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

import sde_lib
from models.registry import get_model, registered_models


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
            having = [n for n in registered_models()
                      if key in {f.name for f in dataclasses.fields(get_model(n))}]
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


def dummy_inputs(config, batch_size: int = 1):
    """(x zeros [B, H, W, C], labels ones [B]): the inputs a network of `config` is traced on."""
    shape = (batch_size, config.data.image_size, config.data.image_size,
             config.data.num_channels)
    return jnp.zeros(shape, jnp.float32), jnp.ones((batch_size,), jnp.float32)
