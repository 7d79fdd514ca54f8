"""This project's parameters as a score_sde_pytorch `checkpoint_<k>.pth` (the inverse of
`_torch`): what yang-song/score_sde_pytorch `utils.save_checkpoint` writes and its
`utils.restore_checkpoint` reads into a DataParallel-wrapped NCSN++ / DDPM++ / DDPM.

Keys: 'module.sigmas' (float64, the VE geometric levels of score_sde_pytorch's get_sigmas), then
'module.all_modules.<i>.<sub>.<leaf>' in model.parameters() order. Index i counts every entry
of the reference's `all_modules` list, including those without parameters (the FIR resamplers
of an output_skip / input_skip pyramid, and resamplers without a conv), which the network's
construction in score_sde_pytorch's models/ncsnpp.py determines; `_has_params` retraces it.
score_sde_pytorch's Combine calls its conv `Conv` (flax: `Conv_0`). Leaf names and layouts:
kernel -> weight ([kh, kw, in, out] -> [out, in, kh, kw]; Dense
[in, out] -> [out, in]); GroupNorm scale -> weight; the rest as they are.
"""

from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from models.from_config import create_model, dummy_inputs
from pretrained import _torch
from pretrained._trees import PretrainedError, creation_order, flatten


def check_exportable(config) -> None:
    """PretrainedError unless score_sde_pytorch has the config's network."""
    name = config.model.name.lower()
    if name not in ("ncsnpp", "ddpm"):
        raise PretrainedError(f"export to score_sde_pytorch supports the 'ncsnpp' (NCSN++, DDPM++) "
                              f"and 'ddpm' networks, not config.model.name={config.model.name!r}")
    if name == "ddpm" and not config.model.resamp_with_conv:
        raise PretrainedError("export to score_sde_pytorch: DDPM with resamp_with_conv=False is "
                              "not supported")


def _has_params(config) -> list[bool]:
    """For each entry of score_sde_pytorch's `all_modules`, whether it holds parameters."""
    check_exportable(config)
    m = config.model
    if m.name.lower() == "ddpm":  # with resampling convs, every entry holds parameters
        return [True] * len(creation_order(config))
    levels = len(m.ch_mult)
    sizes = [config.data.image_size // 2 ** i for i in range(levels)]
    biggan = m.resblock_type.lower() == "biggan"
    resample = biggan or bool(m.resamp_with_conv)
    out = [True] * (m.embedding_type.lower() == "fourier") + [True, True] * bool(m.conditional)
    out.append(True)  # first conv
    for i in range(levels):
        for _ in range(m.num_res_blocks):
            out += [True] + [True] * (sizes[i] in m.attn_resolutions)
        if i != levels - 1:
            out.append(resample)
            # input_skip: an image downsampler (no conv), then the Combine conv.
            out += {"input_skip": [False, True], "residual": [True]}.get(
                m.progressive_input.lower(), [])
    out += [True, True, True]  # middle: resblock, attention, resblock
    for i in reversed(range(levels)):
        out += [True] * (m.num_res_blocks + 1) + [True] * (sizes[i] in m.attn_resolutions)
        progressive = m.progressive.lower()
        if progressive != "none":
            if i == levels - 1:
                out += [True, True]  # GroupNorm, conv
            else:
                # output_skip: an image upsampler (no conv), GroupNorm, conv.
                out += [False, True, True] if progressive == "output_skip" else [True]
        if i != 0:
            out.append(resample)
    if m.progressive.lower() != "output_skip":
        out += [True, True]
    return out


@functools.lru_cache(maxsize=16)
def _call_order(config_json: str) -> dict[tuple[str, ...], int]:
    """Rank of every submodule path by its first call (= PyTorch's registration order)."""
    config = ml_collections.ConfigDict(json.loads(config_json))
    model = create_model(config)
    order: dict[tuple[str, ...], int] = {}

    def record(next_fun, args, kwargs, context):
        scope = context.module.scope
        if scope is not None and tuple(scope.path) not in order:
            order[tuple(scope.path)] = len(order)
        return next_fun(*args, **kwargs)

    x, labels = dummy_inputs(config)
    rngs = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(rngs, x, labels, train=False))
    return order


def _torch_leaf(path: tuple, value: np.ndarray) -> tuple[str, np.ndarray]:
    leaf = path[-1]
    if leaf == "kernel":
        if value.ndim == 4:
            return "weight", value.transpose(3, 2, 0, 1)
        return "weight", value.T if value.ndim == 2 else value
    if leaf == "scale":
        return "weight", value
    return leaf, value


def _layout(config):
    """({top-level module: all_modules index}, {module path: call rank})."""
    tops = creation_order(config)
    flags = _has_params(config)
    indices = [i for i, has in enumerate(flags) if has]
    if len(indices) != len(tops):
        raise PretrainedError(f"export to score_sde_pytorch: the network has {len(tops)} "
                              f"modules with parameters, its score_sde_pytorch layout "
                              f"{len(indices)}")
    index = dict(zip(tops, indices, strict=True))
    return index, _call_order(config.to_json_best_effort())


def state_dict(config, params) -> tuple[dict, list]:
    """({torch key: array} in model.parameters() order, [(flax path, torch key)])."""
    index, rank = _layout(config)
    flat = {p: np.asarray(v, np.float32) for p, v in flatten(params).items()}

    def sort_key(path):  # module by first call; weight before bias inside a module
        return (rank.get(path[:-1], len(rank)), path[-1] not in ("kernel", "scale", "W"))

    out, pairs = {}, []
    for path in sorted(flat, key=sort_key):
        leaf, value = _torch_leaf(path, flat[path])
        key = ".".join(("module", "all_modules", str(index[path[0]]),
                        *_torch.torch_submodules(path[0], path[1:-1]), leaf))
        out[key] = np.ascontiguousarray(value)
        pairs.append((path, key))
    return out, pairs


def checkpoint(config, params, params_ema, adam, step: int) -> dict:
    """The dict score_sde_pytorch's utils.save_checkpoint saves: optimizer, model, ema, step.

    `adam`: None or (mu, nu, count) trees shaped like params (Adam's moments)."""
    model, pairs = state_dict(config, params)
    m = config.model
    # score_sde_pytorch models/utils.get_sigmas, computed its way (bit-identical buffer).
    sigmas = np.exp(np.linspace(np.log(m.sigma_max), np.log(m.sigma_min), m.num_scales))
    model = {"module.sigmas": sigmas, **model}
    ema, _ = state_dict(config, params_ema)
    # The Fourier features are fixed (requires_grad=False): not in the EMA list, nor in Adam.
    trainable = [(i, key) for i, (path, key) in enumerate(pairs) if _torch._trainable(path)]
    state = {}
    if adam is not None:
        mu, nu = (state_dict(config, tree)[0] for tree in adam[:2])
        state = {i: {"step": np.asarray(float(adam[2]), np.float32), "exp_avg": mu[key],
                     "exp_avg_sq": nu[key]} for i, key in trainable}
    o = config.optim
    group = {"lr": float(o.lr), "betas": (float(o.beta1), 0.999), "eps": float(o.eps),
             "weight_decay": float(o.weight_decay), "amsgrad": False,
             "params": list(range(len(pairs)))}
    return {"optimizer": {"state": state, "param_groups": [group]}, "model": model,
            "ema": {"decay": float(config.model.ema_rate), "num_updates": int(step),
                    "shadow_params": [ema[key] for _, key in trainable]},
            "step": int(step)}
