"""Parameter trees of this project's networks: creation order, flat views, matching.

A checkpoint from another implementation is turned into a flat {path: array} dict with this
project's names, then matched leaf by leaf against the tree the config's network expects
(`target_shapes`); a difference becomes one `PretrainedError` naming the parameter, both shapes
and the config files of this project whose network would match.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import os

import flax
import flax.linen as nn
import jax
import ml_collections
import numpy as np
from flax import traverse_util

from models.from_config import create_model, dummy_inputs
from models.param_trees import first_difference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PretrainedError(ValueError):
    """A checkpoint that cannot be read or does not fit the config: one line, no traceback."""


def flatten(tree) -> dict[tuple[str, ...], object]:
    return traverse_util.flatten_dict(flax.core.unfreeze(tree))


def unflatten(flat: dict) -> dict:
    return traverse_util.unflatten_dict(flat)


@functools.lru_cache(maxsize=16)
def _shapes_and_order(config_json: str):
    # Keyed by the config's JSON: ConfigDicts are mutable, and tracing a deep network takes
    # seconds, so a load followed by an export traces it once.
    config = ml_collections.ConfigDict(json.loads(config_json))
    model = create_model(config)
    x, labels = dummy_inputs(config)
    order: list[str] = []

    def record(next_fun, args, kwargs, context):
        # Direct children of the network, in the order their __call__ first runs: in a compact
        # module that is the order they are created, which fixes flax's automatic names.
        scope = context.module.scope
        if context.method_name == "__call__" and scope is not None and len(scope.path) == 1:
            if scope.path[0] not in order:
                order.append(scope.path[0])
        return next_fun(*args, **kwargs)

    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda: model.init(rngs, x, labels, train=False))
    shapes = {path: tuple(leaf.shape) for path, leaf in flatten(variables["params"]).items()}
    tops = {path[0] for path in shapes}
    return shapes, tuple(name for name in order if name in tops)


def target_shapes(config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """{path: shape} of the params of the config's network (nothing is allocated)."""
    return dict(_shapes_and_order(config.to_json_best_effort())[0])


def creation_order(config) -> tuple[str, ...]:
    """Names of the network's top-level submodules that hold parameters, in creation order
    (the order of PyTorch's `all_modules` in score_sde_pytorch's NCSN++ and DDPM)."""
    return _shapes_and_order(config.to_json_best_effort())[1]


def count_text(have: dict, want: dict) -> str:
    n_have = sum(int(np.prod(np.shape(v))) for v in have.values())
    n_want = sum(int(np.prod(s)) for s in want.values())
    return f"the checkpoint has {n_have:,} parameters, the config's network {n_want:,}"


def match(flat: dict, config, what: str) -> dict:
    """Checks `flat` against the config's network; returns it as float32 numpy arrays.

    A network whose parameters sit under one submodule (a registry adapter) also accepts a
    checkpoint without that prefix.
    """
    want = target_shapes(config)
    tops = {path[0] for path in want}
    if len(tops) == 1:
        (top,) = tops
        if flat and not any(path[0] == top for path in flat):
            flat = {(top, *path): value for path, value in flat.items()}
    problem = first_difference(flat, want)
    if problem is not None:
        raise mismatch(what, problem, count_text(flat, want), config,
                       lambda cfg: first_difference(flat, target_shapes(cfg)) is None,
                       tree_hints(flat))
    return {path: np.asarray(value, np.float32) for path, value in flat.items()}


def tree_hints(flat: dict) -> dict:
    """What a flax-named checkpoint says cheaply about its config (see `candidate_configs`)."""
    tops = {path[0] for path in flat}
    nf = None
    for key in (("Conv_0", "kernel"), ("init_conv", "kernel")):
        if key in flat:
            nf = int(np.shape(flat[key])[-1])  # the first conv's width
            break
    return {"nf": nf, "fourier": "GaussianFourierProjection_0" in tops,
            "resblocks": sum(name.startswith("ResnetBlock") for name in tops) or None}


def mismatch(what: str, problem: str, counts: str, config, fits, hints: dict) -> PretrainedError:
    """The error for a checkpoint that does not fit `config`, with the config files that fit
    (`fits(candidate_config) -> bool`; `hints` narrow the candidates, see `candidate_configs`)."""
    candidates = [rel for rel, cfg in candidate_configs(config, hints) if _safe(fits, cfg)]
    hint = (f" Config files here whose network matches it: {', '.join(candidates)}."
            if candidates else " No config file in configs/ builds this network as it is; "
            "start from the one of the same model and set the differing model keys.")
    return PretrainedError(f"{what} does not match config.model ({config.model.name}): "
                           f"{problem} ({counts}).{hint}")


def _safe(fits, cfg) -> bool:
    try:
        return bool(fits(cfg))
    except Exception:  # noqa: BLE001 (a candidate that does not even build does not fit)
        return False


def _load_config_file(path: str):
    spec = importlib.util.spec_from_file_location("_candidate_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        return None
    try:
        return module.get_config()
    except TypeError:  # argument configs (path.py:arg) are not candidates
        return None


def _resblocks(cfg) -> int | None:
    """Residual blocks of an NCSN++ / DDPM network, from its config."""
    m = cfg.model
    if m.name not in ("ncsnpp", "ddpm"):
        return None
    levels, n = len(m.ch_mult), m.num_res_blocks
    resampling = 2 * (levels - 1) if m.name == "ncsnpp" and m.resblock_type == "biggan" else 0
    return levels * n + 2 + levels * (n + 1) + resampling


def _plausible(cfg, config, hints: dict) -> bool:
    if cfg.model.name != config.model.name:
        return False
    if hints.get("nf") is not None and cfg.model.get("nf") != hints["nf"]:
        return False
    if hints.get("fourier") is not None and cfg.model.name == "ncsnpp" and \
            (str(cfg.model.embedding_type).lower() == "fourier") != hints["fourier"]:
        return False
    return hints.get("resblocks") is None or _resblocks(cfg) in (None, hints["resblocks"])


def candidate_configs(config, hints: dict, limit: int = 6):
    """(relative path, config) of the configs/**.py that may build the checkpoint's network:
    the same model as `config`, and the base width, Fourier features and residual-block count
    in `hints` (any may be None). Cheap filters, so that at most `limit` networks get traced."""
    out = []
    for path in sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True)):
        name = os.path.basename(path)
        if name.startswith(("__", "default_", "presets", "tiny_")):
            continue
        try:
            cfg = _load_config_file(path)
        except Exception:  # noqa: BLE001 (a broken candidate is simply not suggested)
            continue
        if cfg is not None and _plausible(cfg, config, hints):
            out.append((os.path.relpath(path, REPO), cfg))
            if len(out) >= limit:
                break
    return out
