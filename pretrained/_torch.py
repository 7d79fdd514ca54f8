"""score_sde_pytorch checkpoints (`checkpoint_<k>.pth`) as this project's parameter trees.

The reference's NCSN++ / DDPM++ / DDPM keep their layers in one `all_modules` ModuleList, built
in the order the flax networks create their top-level submodules; sub-module names inside a
block are flax's (`GroupNorm_0`, `Conv_0`, `Dense_0`, `NIN_0`, `Conv2d_0`). So entry i of
`all_modules` that holds parameters is the i-th top-level module of this project's network in
creation order (`_trees.creation_order`), and only leaf names and layouts differ:
conv weight [out, in, kh, kw] -> kernel [kh, kw, in, out]; Linear weight [out, in] -> kernel
[in, out]; GroupNorm weight -> scale; NIN W, b and the Fourier W are unchanged.

Checkpoint layout (yang-song/score_sde_pytorch utils.save_checkpoint): {'model': state dict
(keys prefixed `module.` by DataParallel, first the float64 buffer `sigmas`), 'ema':
{'decay', 'num_updates', 'shadow_params': [trainable parameters in model.parameters() order]},
'optimizer': torch Adam state ({'state': {index: {step, exp_avg, exp_avg_sq}}, ...}), 'step'}.
The Fourier features W are not trainable: they are absent from the EMA list and from Adam.
"""

from __future__ import annotations

import re

import numpy as np

from models.param_trees import first_difference
from pretrained._trees import (
    PretrainedError,
    count_text,
    creation_order,
    mismatch,
    target_shapes,
)

_BUFFERS = ("sigmas",)  # registered buffers of the reference networks, not parameters
_INDEXED = re.compile(r"^all_modules\.(\d+)\.(.+)$")


def split_checkpoint(obj, path: str):
    """(state dict, ema dict or None, optimizer dict or None, step) of a loaded .pth."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        step = obj.get("step", 0)
        return obj["model"], obj.get("ema"), obj.get("optimizer"), int(np.asarray(step))
    if isinstance(obj, dict) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
        return obj, None, None, 0  # a bare state dict
    keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
    raise PretrainedError(f"{path}: not a score_sde_pytorch checkpoint (expected a dict with "
                          f"'model', 'ema', 'optimizer' and 'step', or a state dict; found "
                          f"{keys}).")


def _strip_prefix(state_dict: dict) -> dict:
    if state_dict and all(k.startswith("module.") for k in state_dict):
        return {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict


def torch_submodules(top: str, inner: tuple) -> tuple:
    """score_sde_pytorch's names of the submodules `inner` of flax module `top`: its Combine
    (layerspp.Combine, the input-skip pyramid's) names its 1x1 conv `Conv`, flax `Conv_0`."""
    if top.startswith("Combine_") and inner[:1] == ("Conv_0",):
        return ("Conv", *inner[1:])
    return tuple(inner)


def _flax_submodules(top: str, inner: list) -> list:
    if top.startswith("Combine_") and inner[:1] == ["Conv"]:
        return ["Conv_0", *inner[1:]]
    return inner


def _leaf(torch_name: str, module_path: tuple, want: dict):
    """(flax leaf name, layout function) for a PyTorch leaf inside flax `module_path`."""
    if torch_name == "weight":
        if (*module_path, "kernel") in want:
            return "kernel", _to_flax_layout
        if (*module_path, "scale") in want:
            return "scale", np.asarray
    return torch_name, np.asarray


def _to_flax_layout(w):
    w = np.asarray(w)
    if w.ndim == 4:
        return w.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
    if w.ndim == 2:
        return w.T  # Linear [out, in] -> Dense [in, out]
    return w


def _groups(state_dict: dict, path: str) -> list[tuple[int, list[tuple[str, str]]]]:
    """[(all_modules index, [(torch key, key inside the module)])] in state-dict order."""
    groups: dict[int, list] = {}
    for key in state_dict:
        if key in _BUFFERS:
            continue
        found = _INDEXED.match(key)
        if found is None:
            raise PretrainedError(
                f"{path}: parameter {key!r} is not in `all_modules`; only score_sde_pytorch's "
                "NCSN++ / DDPM++ / DDPM networks ('ncsnpp', 'ddpm') can be imported from "
                ".pth files (use the score_sde Flax checkpoint for NCSN, NCSNv2 and the "
                "classifier).")
        groups.setdefault(int(found.group(1)), []).append((key, found.group(2)))
    return sorted(groups.items())


def _shapes_text(shapes: dict) -> str:
    return ", ".join(f"{k} {tuple(v)}" for k, v in sorted(shapes.items()))


def _try_convert(state_dict: dict, config, path: str):
    """(flat flax params, [(flax path, layout)] per PyTorch parameter, problem or None)."""
    groups = _groups(state_dict, path)
    names = creation_order(config)
    want = target_shapes(config)
    flat, order, problem = {}, [], None
    for (index, members), top in zip(groups, names, strict=False):
        module = {}
        for key, inner in members:
            parts = inner.split(".")
            module_path = (top, *_flax_submodules(top, parts[:-1]))
            leaf, layout = _leaf(parts[-1], module_path, want)
            flat[(*module_path, leaf)] = module[(*module_path, leaf)] = layout(state_dict[key])
            order.append(((*module_path, leaf), layout))
        expected = {p: s for p, s in want.items() if p[0] == top}
        if problem is None and first_difference(module, expected) is not None:
            # Modules pair up by position: name the first pair that differs, not a leaf of a
            # misaligned pair.
            theirs = {inner: np.shape(state_dict[key]) for key, inner in members}
            ours = {"/".join(p[1:]): s for p, s in expected.items()}
            problem = (f"all_modules.{index} in the checkpoint ({_shapes_text(theirs)}) differs "
                       f"from {top} in the config ({_shapes_text(ours)})")
    if len(groups) != len(names):
        problem = (f"the checkpoint has {len(groups)} modules with parameters, the config's "
                   f"network {len(names)}" + (f"; {problem}" if problem else ""))
    return flat, order, problem


def convert_state_dict(state_dict: dict, config, path: str):
    """(flat flax params {path: array}, [(flax path, layout)] per PyTorch parameter in order).

    Raises PretrainedError naming the first parameter that differs and the config files
    whose network the checkpoint fits.
    """
    state_dict = _strip_prefix(state_dict)
    flat, order, problem = _try_convert(state_dict, config, path)
    if problem is not None:
        def fits(cfg):
            return _try_convert(state_dict, cfg, path)[2] is None

        raise mismatch(path, problem, count_text(flat, target_shapes(config)), config, fits,
                       hints(state_dict))
    return flat, order


def hints(state_dict: dict) -> dict:
    """Base width and Fourier features of a score_sde_pytorch NCSN++ / DDPM state dict (see
    `_trees.candidate_configs`)."""
    first_conv = next((v for v in state_dict.values() if np.ndim(v) == 4), None)
    return {"nf": None if first_conv is None else int(np.shape(first_conv)[0]),
            "fourier": np.ndim(state_dict.get("all_modules.0.W")) == 1, "resblocks": None}


def _trainable(flax_path) -> bool:
    # The Fourier features are a fixed buffer-like parameter (requires_grad=False).
    return not (flax_path[-1] == "W" and flax_path[0].startswith("GaussianFourierProjection"))


def convert_list(values: list, order: list, params: dict, what: str, path: str) -> dict:
    """A list in model.parameters() order (the EMA's shadow_params) -> flat flax dict.

    Lists restricted to trainable parameters take the fixed ones from `params`.
    """
    trainable = [(p, f) for p, f in order if _trainable(p)]
    if len(values) == len(order):
        pairs = order
    elif len(values) == len(trainable):
        pairs = trainable
    else:
        raise PretrainedError(f"{path}: {what} holds {len(values)} tensors, but the model has "
                              f"{len(order)} parameters ({len(trainable)} trainable).")
    out = dict(params)
    for value, (flax_path, layout) in zip(values, pairs, strict=True):
        array = layout(value)
        if array.shape != params[flax_path].shape:
            raise PretrainedError(f"{path}: {what} entry for {'/'.join(flax_path)} has shape "
                                  f"{array.shape}, the parameter {params[flax_path].shape}.")
        out[flax_path] = array
    return out


def adam_moments(optimizer, order: list, params: dict, path: str):
    """(mu, nu, count) flat dicts from torch Adam's state, or None if it holds none.

    Parameters without an entry (the fixed Fourier features) get zero moments, which is what
    Adam's state holds for a parameter whose gradient is always zero.
    """
    state = optimizer.get("state") if isinstance(optimizer, dict) else None
    if not state:
        return None
    mu = {p: np.zeros_like(v) for p, v in params.items()}
    nu = {p: np.zeros_like(v) for p, v in params.items()}
    count = 0
    for index, (flax_path, layout) in enumerate(order):
        entry = state.get(index)
        if entry is None:
            continue
        if not {"exp_avg", "exp_avg_sq"} <= set(entry):
            raise PretrainedError(f"{path}: optimizer state {index} is not Adam's "
                                  f"(keys {sorted(entry)}).")
        for target, name in ((mu, "exp_avg"), (nu, "exp_avg_sq")):
            array = layout(entry[name])
            if array.shape != params[flax_path].shape:
                raise PretrainedError(f"{path}: optimizer {name} of {'/'.join(flax_path)} has "
                                      f"shape {array.shape}, the parameter "
                                      f"{params[flax_path].shape}.")
            target[flax_path] = array
        count = max(count, int(np.asarray(entry.get("step", 0))))
    return mu, nu, count
