"""NCSN++ (VE) in diffusers' layout: `UNet2DModel` weight names, its config, the scheduler.

diffusers ports only the VE NCSN++ variant with an output-skip / input-skip pyramid (its
`ScoreSdeVePipeline` and the `google/ncsnpp-*` checkpoints). Its module layout follows the
network's creation order, so the names are derived from this project's network
(`_trees.creation_order`), following the key mapping of diffusers'
scripts/convert_ncsnpp_original_checkpoint_to_diffusers.py:

  Fourier W -> time_proj; Dense_0/1 -> time_embedding.linear_1/2; first conv -> conv_in;
  level i: residual block j -> down_blocks.i.resnets.j (+ attentions.j), the down-sampling
  block -> resnet_down, the input-skip combine conv -> skip_conv; middle: resnets.0,
  attentions.0, resnets.1; up level u: resnets.j, attentions.0, the output-skip GroupNorm and
  conv -> skip_norm, skip_conv (the last level's: conv_norm_out, conv_out), resnet_up.
  Inside a residual block GroupNorm_0, Conv_0, Dense_0, GroupNorm_1, Conv_1, Conv_2 ->
  norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut; inside attention GroupNorm_0,
  NIN_0..3 -> group_norm, to_q, to_k, to_v, to_out.0.
"""

from __future__ import annotations

import math

import numpy as np

from pretrained._trees import PretrainedError, creation_order, target_shapes

DIFFUSERS_VERSION = "0.42.1"  # the version whose format this writes (fixtures were made by it)
_RESNET = {"GroupNorm_0": "norm1", "Conv_0": "conv1", "Dense_0": "time_emb_proj",
           "GroupNorm_1": "norm2", "Conv_1": "conv2", "Conv_2": "conv_shortcut"}
_ATTENTION = {"GroupNorm_0": "group_norm", "NIN_0": "to_q", "NIN_1": "to_k", "NIN_2": "to_v",
              "NIN_3": "to_out.0"}
_WIDE_ATTENTION = 128  # diffusers' in-level attention blocks equal the reference from here on


def _value(config, key):
    return str(config.model[key]).lower() if isinstance(config.model[key], str) \
        else config.model[key]


def problems(config) -> list[str]:
    """What keeps diffusers' UNet2DModel from expressing the config's network (empty: ok)."""
    m = config.model
    out = []
    required = {"name": "ncsnpp", "embedding_type": "fourier", "progressive": "output_skip",
                "progressive_input": "input_skip", "progressive_combine": "sum",
                "resblock_type": "biggan", "nonlinearity": "swish"}
    for key, value in required.items():
        if _value(config, key) != value:
            out.append(f"model.{key}={m[key]!r} (diffusers: {value!r})")
    for key in ("fir", "scale_by_sigma", "conditional", "skip_rescale"):
        if not m[key]:
            out.append(f"model.{key}={m[key]!r} (diffusers: True)")
    if tuple(m.fir_kernel) != (1, 3, 3, 1):
        out.append(f"model.fir_kernel={list(m.fir_kernel)} (diffusers: [1, 3, 3, 1])")
    if m.ch_mult[0] != 1:
        out.append(f"model.ch_mult[0]={m.ch_mult[0]} (diffusers: 1)")
    if config.training.sde.lower() != "vesde":
        out.append(f"training.sde={config.training.sde!r} (diffusers' pipeline: 'vesde')")
    for level, mult in enumerate(m.ch_mult):
        size = config.data.image_size >> level
        # AttnSkipDown/UpBlock2D use 32 groups where the reference uses min(C // 4, 32).
        if size in m.attn_resolutions and m.nf * mult < _WIDE_ATTENTION:
            out.append(f"attention at {size} px with {m.nf * mult} channels (diffusers' "
                       f"in-level attention matches only from {_WIDE_ATTENTION} channels)")
    return out


def check_expressible(config, what: str) -> None:
    found = problems(config)
    if found:
        raise PretrainedError(f"{what}: diffusers' UNet2DModel cannot express this network: "
                              + "; ".join(found) + ". It ports only VE NCSN++ with "
                              "progressive='output_skip', progressive_input='input_skip', "
                              "combine 'sum', FIR BigGAN blocks and Fourier features.")


def _module_names(config) -> dict[str, str]:
    """{top-level flax module: diffusers prefix} for the config's network."""
    m = config.model
    order = iter(creation_order(config))
    names: dict[str, str] = {}

    def take(kind: str, prefix: str) -> None:
        name = next(order, None)
        if name is None or not name.startswith(kind):
            raise PretrainedError(f"unexpected network layout: {name!r} where diffusers has "
                                  f"{prefix} ({kind})")
        names[name] = prefix

    levels, blocks = len(m.ch_mult), m.num_res_blocks
    attn = [config.data.image_size >> i in m.attn_resolutions for i in range(levels)]
    take("GaussianFourierProjection", "time_proj")
    take("Dense", "time_embedding.linear_1")
    take("Dense", "time_embedding.linear_2")
    take("Conv", "conv_in")
    for i in range(levels):
        for j in range(blocks):
            take("ResnetBlock", f"down_blocks.{i}.resnets.{j}")
            if attn[i]:
                take("AttnBlock", f"down_blocks.{i}.attentions.{j}")
        if i != levels - 1:
            take("ResnetBlock", f"down_blocks.{i}.resnet_down")
            take("Combine", f"down_blocks.{i}.skip_conv")
    take("ResnetBlock", "mid_block.resnets.0")
    take("AttnBlock", "mid_block.attentions.0")
    take("ResnetBlock", "mid_block.resnets.1")
    for u, i in enumerate(reversed(range(levels))):
        for j in range(blocks + 1):
            take("ResnetBlock", f"up_blocks.{u}.resnets.{j}")
        if attn[i]:
            take("AttnBlock", f"up_blocks.{u}.attentions.0")
        if i == 0:
            take("GroupNorm", "conv_norm_out")
            take("Conv", "conv_out")
        else:
            take("GroupNorm", f"up_blocks.{u}.skip_norm")
            take("Conv", f"up_blocks.{u}.skip_conv")
            take("ResnetBlock", f"up_blocks.{u}.resnet_up")
    return names


def _leaf_name(path: tuple[str, ...], prefix: str) -> str:
    top, *inner = path
    *modules, leaf = inner
    if top.startswith("ResnetBlock"):
        modules = [_RESNET[n] for n in modules]
    elif top.startswith("AttnBlock"):
        modules = [_ATTENTION[n] for n in modules]
    elif top.startswith("Combine"):
        modules = []  # Combine_k/Conv_0 is the skip conv itself
    leaf = {"kernel": "weight", "scale": "weight", "W": "weight", "b": "bias"}.get(leaf, leaf)
    return ".".join([prefix, *modules, leaf])


def to_diffusers_layout(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)  # [kh, kw, in, out] -> [out, in, kh, kw]
    if array.ndim == 2:
        return array.T  # Dense kernel / NIN W [in, out] -> Linear weight [out, in]
    return array


def to_flax_layout(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def key_map(config) -> dict[tuple[str, ...], str]:
    """{flax param path: diffusers state-dict key} for every parameter of the network."""
    names = _module_names(config)
    return {path: _leaf_name(path, names[path[0]]) for path in target_shapes(config)}


def unet_config(config) -> dict:
    """UNet2DModel's config.json for the network of `config`."""
    m = config.model
    size = config.data.image_size
    kinds = ["AttnSkip" if size >> i in m.attn_resolutions else "Skip"
             for i in range(len(m.ch_mult))]
    return {
        "_class_name": "UNet2DModel", "_diffusers_version": DIFFUSERS_VERSION,
        "act_fn": "silu", "add_attention": True, "attention_head_dim": None,
        "attn_norm_num_groups": None,
        "block_out_channels": [int(m.nf * c) for c in m.ch_mult],
        # diffusers centres [0, 1] inputs itself (x -> 2x - 1), as the network does.
        "center_input_sample": not config.data.centered,
        "class_embed_type": None,
        "down_block_types": [f"{k}DownBlock2D" for k in kinds],
        "downsample_padding": 1, "downsample_type": "conv", "dropout": float(m.dropout),
        "flip_sin_to_cos": True, "freq_shift": 0,
        "in_channels": config.data.num_channels, "layers_per_block": int(m.num_res_blocks),
        "mid_block_scale_factor": math.sqrt(2.0), "mid_block_type": "UNetMidBlock2D",
        # None: min(C // 4, 32) groups, as NCSN++.
        "norm_eps": 1e-6, "norm_num_groups": None, "num_class_embeds": None,
        "num_train_timesteps": None, "out_channels": config.data.num_channels,
        "resnet_time_scale_shift": "default", "sample_size": size,
        "time_embedding_dim": None, "time_embedding_type": "fourier",
        "up_block_types": [f"{k}UpBlock2D" for k in reversed(kinds)],
        "upsample_type": "conv",
    }


def scheduler_config(config) -> dict:
    """ScoreSdeVeScheduler's config from the VE SDE and the PC sampler settings."""
    m, s = config.model, config.sampling
    return {"_class_name": "ScoreSdeVeScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "correct_steps": int(s.n_steps_each), "num_train_timesteps": int(m.num_scales),
            "sampling_eps": 1e-5, "sigma_max": float(m.sigma_max),
            "sigma_min": float(m.sigma_min), "snr": float(s.snr)}


MODEL_INDEX = {"_class_name": "ScoreSdeVePipeline", "_diffusers_version": DIFFUSERS_VERSION,
               "scheduler": ["diffusers", "ScoreSdeVeScheduler"],
               "unet": ["diffusers", "UNet2DModel"]}


def config_differences(unet: dict, config) -> list[str]:
    """Keys of a stored UNet config that contradict the one `config` implies."""
    expected = unet_config(config)
    keys = ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
            "in_channels", "out_channels", "center_input_sample", "time_embedding_type")
    out = []
    for key in keys:
        have = unet.get(key)
        if have is not None and list(np.atleast_1d(have)) != list(np.atleast_1d(expected[key])):
            out.append(f"{key} is {have} in the checkpoint but {expected[key]} for the config")
    return out
