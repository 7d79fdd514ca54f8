"""The model registry: `config.model.name` -> a flax Module class.

Its keys are the only list of valid model names; a network (built-in or a plugin's) registers
itself with `@register_model(name=...)`.
"""

from __future__ import annotations

import importlib

_MODELS: dict[str, type] = {}

# The networks of this project, imported on the first look-up so that importing the registry
# stays cheap (and free of cycles: they import it to register themselves).
_BUILTIN_MODULES = ("ncsnpp", "ddpm", "ncsnv2", "wideresnet_noise_conditional")


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
    for module in _BUILTIN_MODULES:
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
