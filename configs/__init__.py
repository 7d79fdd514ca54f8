"""ml_collections configs: one `default_*_configs.py` per dataset, variants under ve/ vp/ subvp/.

Each variant module defines `get_config()` (or `get_config(arg)`, run as
`--config=path.py:arg`), starts from its dataset default, applies the presets it names
(`configs.presets`) and overrides only what differs. Every key a variant sets exists in its
default, so configs can be locked.

`complete(config)` fills a config written in the reference's format (yang-song/score_sde) with
the keys this project added. A plugin (`config.plugins`, see `configs.plugins`) declares the
config keys it reads with `register_defaults`; every config then has them.
"""

from __future__ import annotations

import copy
import importlib
import pkgutil

import ml_collections

_FIRST_DEFAULT = "default_cifar10_configs"

# Keys plugins declared: "section.key" -> default value (register_defaults).
_PLUGIN_DEFAULTS: dict[str, object] = {}


def register_defaults(defaults: dict) -> None:
    """Declares config keys a plugin reads, with their defaults: {'model.my_k': 1.0, ...}.

    Called at the plugin's import; from then on every config loaded by main.py and every
    `complete(config)` has these keys, so `--config.model.my_k=2` works on the command line.
    A key may not be declared twice with different defaults.
    """
    for key, value in defaults.items():
        parts = key.split(".")
        if len(parts) < 2 or not all(p.isidentifier() for p in parts):
            raise ValueError(f"Config key {key!r} must be 'section.name' (e.g. 'model.my_k').")
        if key in _PLUGIN_DEFAULTS and _PLUGIN_DEFAULTS[key] != value:
            raise ValueError(f"Config key {key!r} is already declared with default "
                             f"{_PLUGIN_DEFAULTS[key]!r}, not {value!r}.")
        _PLUGIN_DEFAULTS[key] = value


def add_plugin_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds to `config` (in place, even when locked) the declared keys it lacks; returns it."""
    with config.unlocked():
        for key, value in _PLUGIN_DEFAULTS.items():
            *sections, name = key.split(".")
            node = config
            for section in sections:
                if section not in node:
                    node[section] = ml_collections.ConfigDict()
                node = node[section]
            if not isinstance(node, ml_collections.ConfigDict):
                raise ValueError(f"Config key {key!r}: {'.'.join(sections)} is not a section.")
            if name not in node:
                node[name] = copy.deepcopy(value)
    return config


def _default_module_names() -> list[str]:
    names = sorted(info.name for info in pkgutil.iter_modules(__path__)
                   if info.name.startswith("default_") and info.name.endswith("_configs"))
    names.remove(_FIRST_DEFAULT)
    return [_FIRST_DEFAULT, *names]


def project_defaults() -> ml_collections.ConfigDict:
    """The project's key set with default values: the CIFAR-10 default, plus any key or
    section another `default_*_configs.py` adds (with that default's value), plus the keys
    plugins declared (`register_defaults`)."""
    merged = None
    for name in _default_module_names():
        config = importlib.import_module(f"{__name__}.{name}").get_default_configs()
        if merged is None:
            merged = config
        else:
            _fill(merged, config, "")
    return add_plugin_defaults(merged)


def _fill(target: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict,
          prefix: str) -> None:
    # Adds to `target`, recursively, what it lacks of `defaults`; never overwrites a value.
    for key, value in defaults.items():
        if key not in target:
            target[key] = copy.deepcopy(value)
        elif isinstance(value, ml_collections.ConfigDict):
            if not isinstance(target[key], ml_collections.ConfigDict):
                raise ValueError(f"Config key {prefix}{key} is {target[key]!r}, but the "
                                 f"project's defaults make it a section with keys "
                                 f"{sorted(value.keys())}.")
            _fill(target[key], value, f"{prefix}{key}.")


def complete(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A locked copy of `config` holding every key of the project's defaults.

    For configs in the reference's format, which lack the keys this project added
    (`sampling.ode_method`, `eval.bpd_num_repeats`, `data.data_dir`, ...). Keys `config`
    has keep its values, including keys the project does not use (the reference's
    `model.conv_size` and the like are harmless); absent keys and whole absent sections take
    their default values (`project_defaults()`). The key set is read from the default modules
    on every call, so keys added there later need no change here. `config` may be locked
    and is not modified.
    """
    out = copy.deepcopy(ml_collections.ConfigDict(config))
    out.unlock()
    _fill(out, project_defaults(), "")
    out.lock()
    return out
