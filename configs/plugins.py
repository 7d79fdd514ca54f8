"""Plugins: a researcher's own files or modules, named by `config.plugins`, imported first.

`config.plugins` is a comma-separated list of Python files (`my_sde.py`, `/abs/dir/net.py`)
or importable module names (`mypackage.my_sde`). A plugin registers what it adds
(`sde_lib.register_sde`, `sampling.register_predictor` / `register_corrector` /
`register_sampler`, `models.utils.register_model`, `datasets.register_dataset`) and declares
the config keys it reads (`configs.register_defaults`); docs/extending.md has an example of
each.

main.py imports the plugins while it loads the config file, before absl applies the
`--config.*` overrides (so a plugin's own keys can be set on the command line), and the run
records them, files as absolute paths, in `<workdir>/config.json`: every later mode on that
workdir (resume, eval, sample, ...) imports them again without `--config.plugins`.
`run_lib.checks.validate_config` imports them too, for runs started from Python.

This module imports no JAX: a missing plugin is reported before anything heavy starts.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import traceback

import ml_collections
from ml_collections.config_flags import config_flags

import configs


class PluginError(Exception):
    """A plugin that does not exist or fails to import (main.py: one line, exit code 2)."""


# Normalized entry (absolute path or module name) -> the imported module.
_LOADED: dict[str, object] = {}


def _is_file(entry: str) -> bool:
    return entry.endswith(".py") or "/" in entry or os.sep in entry


def entries(*specs: str) -> list[str]:
    """The plugins of comma-separated `specs`, in order, without repeats; files made absolute
    (relative paths are relative to the current directory)."""
    out = []
    for spec in specs:
        for entry in str(spec or "").split(","):
            entry = entry.strip()
            if not entry:
                continue
            entry = os.path.abspath(os.path.expanduser(entry)) if _is_file(entry) else entry
            if entry not in out:
                out.append(entry)
    return out


def normalize(*specs: str) -> str:
    """`entries(*specs)` as the comma-separated string a config records."""
    return ",".join(entries(*specs))


def _failure(entry: str, e: BaseException, origin: str | None) -> str:
    line = None
    if isinstance(e, SyntaxError) and e.filename == origin:
        line = e.lineno
    elif origin is not None:
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == origin]
        line = frames[-1].lineno if frames else None
    where = f" (line {line})" if line else ""
    message = " ".join(f"{type(e).__name__}: {e}".split())
    return f"config.plugins: plugin {entry!r} failed to import{where}: {message}"


def _module_name(path: str) -> str:
    # A name of our own, so a plugin file called e.g. `sampling.py` never shadows a project
    # module; registered in sys.modules (dataclasses and flax resolve annotations there).
    stem = "".join(c if c.isalnum() else "_" for c in os.path.splitext(os.path.basename(path))[0])
    name, i = f"score_sde_plugin_{stem}", 1
    while name in sys.modules:
        i += 1
        name = f"score_sde_plugin_{stem}_{i}"
    return name


def _import_file(path: str):
    if not os.path.isfile(path):
        raise PluginError(f"config.plugins: no such plugin file {path!r}.")
    name = _module_name(path)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    failure = None
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 (a plugin may raise anything)
        del sys.modules[name]
        failure = _failure(path, e, path)
    if failure:  # raised here, outside the handler, so that no traceback chain follows it
        raise PluginError(failure)
    return module


def _import_module(name: str):
    failure = None
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            failure = (f"config.plugins: no such plugin {name!r} (neither a file, give a path "
                       "ending in .py, nor an importable module).")
        else:
            failure = _failure(name, e, None)
    except Exception as e:  # noqa: BLE001 (a plugin may raise anything)
        try:
            origin = getattr(importlib.util.find_spec(name), "origin", None)
        except Exception:  # noqa: BLE001 (its package failed to import: no line to name)
            origin = None
        failure = _failure(name, e, origin)
    raise PluginError(failure)


def load(*specs: str) -> list:
    """Imports the plugins of `specs` (comma-separated), each once per process; returns the
    modules. Raises PluginError naming the first that does not exist or fails to import."""
    modules = []
    for entry in entries(*specs):
        if entry not in _LOADED:
            _LOADED[entry] = _import_file(entry) if _is_file(entry) else _import_module(entry)
        modules.append(_LOADED[entry])
    return modules


def recorded(workdir: str | None) -> str:
    """The plugins recorded in `<workdir>/config.json` ('' if none or no such file)."""
    if not workdir:
        return ""
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            value = json.load(f).get("plugins", "")
    except (OSError, ValueError, AttributeError):
        return ""
    return value if isinstance(value, str) else ""


def _load_recorded(workdir: str | None) -> str:
    """Imports the plugins recorded in `<workdir>/config.json`; returns them."""
    spec = recorded(workdir)
    try:
        load(spec)
    except PluginError as e:
        failure = f"{str(e).rstrip('.')} (recorded in {os.path.join(workdir, 'config.json')})."
    else:
        return spec
    raise PluginError(failure)


def record(config: ml_collections.ConfigDict, workdir: str | None) -> ml_collections.ConfigDict:
    """Imports the workdir's recorded plugins and the config's own, and sets `config.plugins`
    to all of them (what the run records in its config.json). Returns `config`."""
    spec = normalize(_load_recorded(workdir), config.get("plugins", ""))
    load(spec)
    with config.unlocked():
        config.plugins = spec
    return config


def _flag_value(argv, name: str) -> str | None:
    """The last value of `--name=value` / `--name value` in `argv` (None if absent)."""
    value = None
    for i, arg in enumerate(argv[1:], start=1):
        if arg == "--":
            break
        for prefix in (f"--{name}", f"-{name}"):
            if arg.startswith(prefix + "="):
                value = arg[len(prefix) + 1:]
            elif arg == prefix and i + 1 < len(argv):
                value = argv[i + 1]
    return value


class ConfigFileParser(config_flags.ConfigFileFlagParser):
    """The parser of `--config=<file>` that also imports the run's plugins (the workdir's
    recorded ones, then `--config.plugins` or the file's own) and adds the keys they declare,
    before absl applies the `--config.*` overrides (which it reads from sys.argv, as here)."""

    def parse(self, path):
        config = super().parse(path)
        if isinstance(config, ml_collections.ConfigDict):
            argv = sys.argv
            given = _flag_value(argv, "config.plugins")
            _load_recorded(_flag_value(argv, "workdir"))
            load(config.get("plugins", "") if given is None else given)
            configs.add_plugin_defaults(config)
            if "plugins" not in config:  # a config file in the reference's format
                with config.unlocked():
                    config.plugins = ""
        return config


def install(flag) -> None:
    """Makes the `--config` flag (ml_collections' DEFINE_config_file) load plugins first."""
    flag.parser = ConfigFileParser(name=flag.name, lock_config=True)
