"""Released checkpoints of the reference implementations, loaded into this project's networks.

`load(path, config)` reads, with the format detected from the content:
- a score_sde (Flax) `checkpoint_<k>`: flax's msgpack of the reference's train State
  (`{step, optimizer: {target, state: {step, param_states}}, lr, ema_rate, model_state,
  params_ema, rng}`), or a params tree alone (the noise-conditional classifier's checkpoint);
- a score_sde_pytorch `checkpoint_<k>.pth` (read by the torch-free restricted reader
  `evaluation.pth`: no code in the file runs);
- a diffusers `ScoreSdeVePipeline` folder (`model_index.json`; `unet/`, and `unet_ema/` if
  present) or a `UNet2DModel` folder (`config.json` + `diffusion_pytorch_model.safetensors`,
  read with safetensors' numpy backend).

It returns `Pretrained(params, params_ema, model_state, step, format, adam)`, ready for
`models.utils.get_model_fn` / `get_score_fn` with the model `create_model(config)` builds.
`export_diffusers(config, params, out_dir)` writes the reverse: a folder that
`diffusers.ScoreSdeVePipeline.from_pretrained` loads (VE NCSN++ with output/input skips only;
anything else is refused naming what diffusers cannot express).
`export_score_sde_pytorch(config, params, path, ...)` writes a score_sde_pytorch
`checkpoint_<k>.pth` (raw and EMA parameters, Adam's moments, step) that its
`utils.restore_checkpoint` loads into its NCSN++ / DDPM++ / DDPM (`_torch_export`). None of
these imports torch or diffusers.

Every failure is a `PretrainedError` (a ValueError) with one line: an unreadable or hostile
file, or a checkpoint that does not fit the config (naming the parameter, both shapes and the
config files here that would fit).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import serialization

from evaluation.pth import WeightFileError, load_torch_checkpoint
from models.param_trees import first_difference
from pretrained import _diffusers, _pth_writer, _torch, _torch_export
from pretrained._trees import (
    PretrainedError,
    count_text,
    flatten,
    match,
    mismatch,
    target_shapes,
    tree_hints,
    unflatten,
)

__all__ = ["Pretrained", "PretrainedError", "detect_format", "export_diffusers",
           "export_score_sde_pytorch", "load"]

UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


class Pretrained(NamedTuple):
    """A loaded checkpoint. `adam`: None, or (mu, nu, count) trees of Adam's moments shaped
    like `params` when the source stores them (its optimizer's step count)."""

    params: Any
    params_ema: Any
    model_state: dict
    step: int
    format: str
    adam: Any = None


def detect_format(path: str) -> str:
    """'score_sde', 'score_sde_pytorch', 'diffusers_pipeline' or 'diffusers_unet', from the
    content of `path`; PretrainedError for anything else."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "model_index.json")):
            return "diffusers_pipeline"
        if os.path.isfile(os.path.join(path, "config.json")) and \
                os.path.isfile(os.path.join(path, UNET_WEIGHTS)):
            return "diffusers_unet"
        raise PretrainedError(f"{path} is a folder without model_index.json (a diffusers "
                              f"pipeline) or config.json + {UNET_WEIGHTS} (a diffusers UNet).")
    if not os.path.isfile(path):
        raise PretrainedError(f"{path} does not exist (config.pretrained.path).")
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80\x02\x8a\x0a"):
        return "score_sde_pytorch"  # torch.save: zip archive, or the legacy pickle stream
    if head[:1] and (0x81 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return "score_sde"  # a msgpack map (flax.serialization)
    raise PretrainedError(f"{path} is not a checkpoint this project reads: expected a score_sde "
                          "checkpoint_<k> (flax msgpack), a score_sde_pytorch .pth (torch.save) "
                          "or a diffusers folder; its first bytes are " + repr(head[:8]) + ".")


def load(path: str, config) -> Pretrained:
    """Reads the checkpoint at `path` for the network of `config` (see the module doc)."""
    path = os.fspath(path)
    kind = detect_format(path)
    loader = {"score_sde": _load_score_sde, "score_sde_pytorch": _load_pth,
              "diffusers_pipeline": _load_pipeline, "diffusers_unet": _load_unet_folder}[kind]
    return loader(path, config)


def _tree(flat: dict):
    return unflatten({k: jnp.asarray(v) for k, v in flat.items()})


def _kernel_name(path: tuple) -> tuple:
    """This project's name for a reference parameter path. The reference's FIR conv
    (up_or_down_sampling Conv2d) calls its kernel `weight`; every other name is the same."""
    if len(path) >= 2 and path[-2].startswith("Conv2d_") and path[-1] == "weight":
        return (*path[:-1], "kernel")
    return path


def _from_reference_names(tree) -> dict:
    """A reference params tree as a flat {path: array} dict with this project's names."""
    return {_kernel_name(path): np.asarray(value) for path, value in flatten(tree).items()}


# ------------------------------------------------------------------------ score_sde (Flax)

def _load_score_sde(path: str, config) -> Pretrained:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        state = serialization.msgpack_restore(raw)
    except Exception as e:  # noqa: BLE001 (msgpack raises several types for damaged data)
        raise PretrainedError(f"{path}: not a readable flax msgpack checkpoint, truncated or "
                              f"damaged ({type(e).__name__}: {e}).") from None
    if not isinstance(state, dict):
        raise PretrainedError(f"{path}: a msgpack {type(state).__name__}, not a checkpoint.")
    if "optimizer" in state:  # the reference's train State
        try:
            target = state["optimizer"]["target"]
            step = int(np.asarray(state.get("step", state["optimizer"]["state"]["step"])))
        except (KeyError, TypeError, ValueError) as e:
            raise PretrainedError(f"{path}: a score_sde State without optimizer.target / step "
                                  f"({e!r}).") from None
        ema = state.get("params_ema", target)
        model_state = state.get("model_state") or {}
        moments = state["optimizer"].get("state", {}).get("param_states")
    else:  # a params tree alone, e.g. the classifier (restore_checkpoint(path, params))
        target = state.get("params", state)
        ema, model_state, moments, step = target, {}, None, 0
    params = match(_from_reference_names(target), config, path)
    params_ema = match(_from_reference_names(ema), config, f"{path} (params_ema)")
    adam = _flax_moments(moments, config, path, step)
    return Pretrained(_tree(params), _tree(params_ema), model_state, step, "score_sde", adam)


def _flax_moments(moments, config, path, step):
    """flax.optim Adam's {grad_ema, grad_sq_ema} per parameter -> (mu, nu, count) trees."""
    if not isinstance(moments, dict):
        return None
    # Each parameter's leaf is replaced by {grad_ema, grad_sq_ema}, Adam's two moments.
    per_param = flatten(moments)
    mu, nu = (match({_kernel_name(p[:-1]): np.asarray(v) for p, v in per_param.items()
                     if p[-1] == name}, config, f"{path} (Adam moments)")
              for name in ("grad_ema", "grad_sq_ema"))
    return _tree(mu), _tree(nu), step


# ------------------------------------------------------------------------ score_sde_pytorch

def _load_pth(path: str, config) -> Pretrained:
    try:
        obj = load_torch_checkpoint(path)
    except WeightFileError as e:
        raise PretrainedError(str(e)) from None
    state_dict, ema, optimizer, step = _torch.split_checkpoint(obj, path)
    flat, order = _torch.convert_state_dict(state_dict, config, path)
    params = {k: np.asarray(v, np.float32) for k, v in flat.items()}
    if isinstance(ema, dict) and "shadow_params" in ema:
        ema_flat = _torch.convert_list(list(ema["shadow_params"]), order, params,
                                       "ema.shadow_params", path)
    else:
        ema_flat = params
    ema_flat = {k: np.asarray(v, np.float32) for k, v in ema_flat.items()}
    moments = _torch.adam_moments(optimizer, order, params, path)
    adam = None if moments is None else (_tree(moments[0]), _tree(moments[1]), moments[2])
    return Pretrained(_tree(params), _tree(ema_flat), {}, step, "score_sde_pytorch", adam)


# ------------------------------------------------------------------------ diffusers

def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{path}: not readable JSON ({e}).") from None


def _read_unet(folder: str, config) -> dict:
    """Flat flax params of a UNet2DModel folder, checked against `config`."""
    what = folder
    _diffusers.check_expressible(config, what)
    unet = _read_json(os.path.join(folder, "config.json"))
    if unet.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise PretrainedError(f"{folder}: a {unet.get('_class_name')}, not a UNet2DModel.")
    weights = os.path.join(folder, UNET_WEIGHTS)
    try:
        tensors = safetensors.numpy.load_file(weights)
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise PretrainedError(f"{weights}: not a readable safetensors file ({e}).") from None
    keys = _diffusers.key_map(config)
    flat = {path: _diffusers.to_flax_layout(tensors[key])
            for path, key in keys.items() if key in tensors}
    want = target_shapes(config)
    problem = first_difference(flat, want)
    extra = sorted(set(tensors) - set(keys.values()))
    differences = _diffusers.config_differences(unet, config)
    if problem or extra or differences:
        detail = problem or (f"weights {extra[:3]} have no place in the config's network"
                             if extra else differences[0])
        if problem and differences:
            detail += f"; {differences[0]}"

        def fits(cfg):
            try:
                k = _diffusers.key_map(cfg)
            except PretrainedError:
                return False
            return set(k.values()) == set(tensors) and all(
                _diffusers.to_flax_layout(tensors[k[p]]).shape == s
                for p, s in target_shapes(cfg).items())

        raise mismatch(what, detail, count_text(flat, want), config, fits, tree_hints(flat))
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def _load_unet_folder(path: str, config) -> Pretrained:
    params = _tree(_read_unet(path, config))
    return Pretrained(params, params, {}, 0, "diffusers_unet")


def _load_pipeline(path: str, config) -> Pretrained:
    index = _read_json(os.path.join(path, "model_index.json"))
    unet = index.get("unet")
    if not (isinstance(unet, list) and unet[-1] == "UNet2DModel"):
        raise PretrainedError(f"{path}: model_index.json has no UNet2DModel 'unet' (found "
                              f"{unet!r}); only ScoreSdeVePipeline folders are supported.")
    _check_scheduler(path, config)
    params = _tree(_read_unet(os.path.join(path, "unet"), config))
    ema_folder = os.path.join(path, "unet_ema")
    ema = _tree(_read_unet(ema_folder, config)) if os.path.isdir(ema_folder) else params
    return Pretrained(params, ema, {}, 0, "diffusers_pipeline")


def _check_scheduler(path: str, config) -> None:
    scheduler = os.path.join(path, "scheduler", "scheduler_config.json")
    if not os.path.isfile(scheduler):
        return
    stored = _read_json(scheduler)
    expected = _diffusers.scheduler_config(config)
    for key, config_key in (("sigma_min", "model.sigma_min"), ("sigma_max", "model.sigma_max"),
                            ("num_train_timesteps", "model.num_scales")):
        if key in stored and not np.isclose(float(stored[key]), float(expected[key])):
            raise PretrainedError(
                f"{scheduler}: {key}={stored[key]} but config.{config_key}={expected[key]}; "
                f"use the config of this checkpoint (e.g. sigma_max 348 for 256 px FFHQ / "
                f"CelebA-HQ, 1348 for 1024 px) or set --config.{config_key}={stored[key]}.")


def export_diffusers(config, params, out_dir: str) -> str:
    """Writes a ScoreSdeVePipeline folder (model_index.json, unet/, scheduler/) holding
    `params` for the network of `config`; returns `out_dir`.

    Refuses a network diffusers cannot express, and an existing non-empty `out_dir`. The
    folder is written next to `out_dir` and renamed into place, so it is whole or absent.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    _diffusers.check_expressible(config, "export_diffusers")
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise PretrainedError(f"{out_dir} exists and is not empty; give a new folder.")
    flat = match({k: np.asarray(v) for k, v in flatten(params).items()}, config, "params")
    keys = _diffusers.key_map(config)
    tensors = {keys[p]: np.ascontiguousarray(_diffusers.to_diffusers_layout(v))
               for p, v in flat.items()}
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".export-", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the export is an ordinary folder
    try:
        os.makedirs(os.path.join(tmp, "unet"))
        os.makedirs(os.path.join(tmp, "scheduler"))
        safetensors.numpy.save_file(tensors, os.path.join(tmp, "unet", UNET_WEIGHTS),
                                    metadata={"format": "pt"})
        _write_json(os.path.join(tmp, "unet", "config.json"), _diffusers.unet_config(config))
        _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"),
                    _diffusers.scheduler_config(config))
        _write_json(os.path.join(tmp, "model_index.json"), _diffusers.MODEL_INDEX)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def export_score_sde_pytorch(config, params, path: str, params_ema=None, adam=None,
                             step: int = 0) -> str:
    """Writes a score_sde_pytorch checkpoint `.pth` at `path`; returns the path.

    params / params_ema: trees for the network of `config` (params_ema None: params);
    adam: None or (mu, nu, count) trees of Adam's moments. Refuses an existing `path` and a
    network score_sde_pytorch does not have (only 'ncsnpp' and 'ddpm' export).
    """
    path = os.path.abspath(os.fspath(path))
    _torch_export.check_exportable(config)
    if os.path.exists(path):
        raise PretrainedError(f"{path} exists; give a new file name (nothing was overwritten).")

    def checked(tree, what):
        return unflatten(match({k: np.asarray(v) for k, v in flatten(tree).items()}, config,
                               what))

    params = checked(params, "params")
    params_ema = params if params_ema is None else checked(params_ema, "params_ema")
    if adam is not None:
        adam = (checked(adam[0], "Adam mu"), checked(adam[1], "Adam nu"), int(adam[2]))
    obj = _torch_export.checkpoint(config, params, params_ema, adam, int(step))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _pth_writer.save(obj, path)
    return path
