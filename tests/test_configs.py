"""Tests for configs/: every config module is found by walking the folder, built, and checked.

Checks: required sections and keys; valid SDE / predictor / corrector / model / dataset names;
each variant only sets keys the dataset defaults define (so configs can be locked); network
shapes that cannot work (image size vs. ch_mult, attention at a resolution never reached);
removed keys stay removed; docstrings open with the command that runs the file; the resolved
values against the reference (yang-song/score_sde configs and the paper), transcribed here
independently of the config files; every config against a snapshot of its values taken
before the configs were rebuilt on presets; `configs.complete` on reference-format configs.
"""

from __future__ import annotations

import importlib
import json
import pathlib

import ml_collections
import pytest

import configs
import datasets
import sampling
import sde_lib
from configs import presets
from models import utils as mutils

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"
SECTIONS = ("training", "sampling", "eval", "data", "model", "optim")
# The valid names are the registries' keys (the only lists of them).
SDES = sde_lib.registered_sdes()
PREDICTORS = sampling.registered_predictors()
CORRECTORS = sampling.registered_correctors()
MODELS = mutils.registered_models()
DATASETS = datasets.valid_names()


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(CONFIG_DIR.parent).with_suffix("")
    return ".".join(rel.parts)


def _discover():
    """Sorts configs/*.py into defaults, plain variants (`get_config()`), variants that take an
    argument (`get_config(arg)` with `CHOICES`; one id `path:arg` per choice), and helpers."""
    defaults, variants, with_args, helpers = [], [], [], []
    for path in sorted(CONFIG_DIR.rglob("*.py")):
        if path.name == "__init__.py":
            continue
        module = importlib.import_module(_module_name(path))
        rel = str(path.relative_to(CONFIG_DIR))
        if path.name.startswith("default_"):
            defaults.append(path)
        elif hasattr(module, "CHOICES"):
            with_args.extend(f"{rel}:{arg}" for arg in module.CHOICES)
        elif hasattr(module, "get_config"):
            variants.append(path)
        else:
            helpers.append(rel)
    return defaults, variants, with_args, helpers


DEFAULT_PATHS, VARIANT_PATHS, ARG_IDS, HELPERS = _discover()
VARIANT_IDS = [str(p.relative_to(CONFIG_DIR)) for p in VARIANT_PATHS]
# Keys deleted from every config: never read by the library. NCSN / NCSNv2 derive their number
# of noise-conditioning classes from model.num_scales (models.utils.create_model).
REMOVED_KEYS = ("training.log_progress", "model.attention_type", "model.conv_size",
                "optim.amsgrad", "model.num_classes")


def _flat(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _load_variant(path: pathlib.Path):
    module = importlib.import_module(_module_name(path))
    return module, module.get_config()


def _load_with_arg(arg_id: str):
    rel, arg = arg_id.split(":")
    module = importlib.import_module(_module_name(CONFIG_DIR / rel))
    return module, module.get_config(arg)


@pytest.fixture(scope="module")
def variants() -> dict:
    loaded = {str(p.relative_to(CONFIG_DIR)): _load_variant(p) for p in VARIANT_PATHS}
    loaded.update({arg_id: _load_with_arg(arg_id) for arg_id in ARG_IDS})
    return loaded


def _default_keys() -> set:
    keys = set()
    for path in DEFAULT_PATHS:
        keys |= set(_flat(importlib.import_module(_module_name(path)).get_default_configs()))
    return keys


# ---------------------------------------------------------------------------------------------
# Reference values, resolved (default + overrides), for every config file.

CIFAR = {
    "data.dataset": "CIFAR10",
    "data.image_size": 32,
    "data.num_channels": 3,
    "training.batch_size": 128,
    "training.n_iters": 1300001,
    "training.n_jitted_steps": 5,
    "training.snapshot_freq": 50000,
    "training.snapshot_freq_for_preemption": 10000,
    "training.log_freq": 50,
    "training.eval_freq": 100,
    "sampling.snr": 0.16,
    "sampling.n_steps_each": 1,
    "sampling.noise_removal": True,
    "model.sigma_min": 0.01,
    "model.sigma_max": 50,
    "model.num_scales": 1000,
    "model.beta_min": 0.1,
    "model.beta_max": 20,
    "model.dropout": 0.1,
    "optim.lr": 2e-4,
    "optim.warmup": 5000,
    "optim.grad_clip": 1.0,
    "optim.beta1": 0.9,
    "optim.eps": 1e-8,
    "eval.batch_size": 1024,
    "eval.num_samples": 50000,
    "eval.begin_ckpt": 9,
    "eval.end_ckpt": 26,
    "seed": 42,
}
CELEBA = {
    "data.dataset": "CELEBA",
    "data.image_size": 64,
    "training.batch_size": 128,
    "sampling.snr": 0.17,
    "model.sigma_max": 90,
    "model.num_scales": 1000,
    "eval.begin_ckpt": 1,
    "eval.end_ckpt": 26,
    "eval.enable_sampling": True,
}
LSUN = {
    "data.image_size": 256,
    "training.batch_size": 64,
    "training.n_jitted_steps": 5,
    "training.n_iters": 2400001,
    "training.snapshot_freq_for_preemption": 5000,
    "sampling.snr": 0.075,
    "model.sigma_max": 378,
    "model.num_scales": 2000,
    "model.dropout": 0.0,
    "eval.batch_size": 512,
    "eval.begin_ckpt": 50,
    "eval.end_ckpt": 96,
}
NCSNPP_32 = {
    "model.name": "ncsnpp",
    "model.nf": 128,
    "model.ch_mult": (1, 2, 2, 2),
    "model.num_res_blocks": 4,
    "model.attn_resolutions": (16,),
    "model.resblock_type": "biggan",
    "model.skip_rescale": True,
    "model.init_scale": 0.0,
    "model.progressive": "none",
    "model.progressive_combine": "sum",
    "model.fir_kernel": [1, 3, 3, 1],
    "model.normalization": "GroupNorm",
    "model.nonlinearity": "swish",
}
VE_CONT = {
    "training.sde": "vesde",
    "training.continuous": True,
    "training.reduce_mean": False,
    "sampling.method": "pc",
    "sampling.predictor": "reverse_diffusion",
    "sampling.corrector": "langevin",
    "data.centered": False,
    "model.scale_by_sigma": True,
    "model.ema_rate": 0.999,
    "model.embedding_type": "fourier",
    "model.fourier_scale": 16,
    "model.fir": True,
    "model.progressive_input": "residual",
}
VP_BASE = {
    "training.reduce_mean": True,
    "sampling.corrector": "none",
    "data.centered": True,
    "model.scale_by_sigma": False,
    "model.ema_rate": 0.9999,
}
# The DDPM network has no embedding_type option (always sinusoidal), so only NCSN++ sets it.
DDPMPP = {
    **NCSNPP_32,
    **VP_BASE,
    "model.fir": False,
    "model.progressive_input": "none",
    "model.embedding_type": "positional",
}
NCSNPP_VP = {
    **NCSNPP_32,
    **VP_BASE,
    "model.fir": True,
    "model.progressive_input": "residual",
    "model.embedding_type": "positional",
}
DDPM_32 = {
    **VP_BASE,
    "model.name": "ddpm",
    "model.nf": 128,
    "model.ch_mult": (1, 2, 2, 2),
    "model.num_res_blocks": 2,
    "model.attn_resolutions": (16,),
    "model.conditional": True,
}
DEEP = {"training.n_iters": 950001, "model.num_res_blocks": 8}
NCSNPP_256 = {
    **VE_CONT,
    "model.name": "ncsnpp",
    "model.nf": 128,
    "model.ch_mult": (1, 1, 2, 2, 2, 2, 2),
    "model.num_res_blocks": 2,
    "model.attn_resolutions": (16,),
    "model.progressive": "output_skip",
    "model.progressive_input": "input_skip",
    "model.ema_rate": 0.999,
}
NCSNPP_1024 = {
    **NCSNPP_256,
    "data.image_size": 1024,
    "training.batch_size": 8,
    "model.nf": 16,
    "model.ch_mult": (1, 2, 4, 8, 16, 32, 32, 32),
    "model.num_res_blocks": 1,
    "model.sigma_max": 1348,
    "model.num_scales": 2000,
    "model.ema_rate": 0.9999,
    "sampling.snr": 0.15,
    "eval.batch_size": 1024,
    "eval.begin_ckpt": 1,
    "eval.end_ckpt": 96,
    "training.n_iters": 2400001,
}
NCSN_ANY = {
    "training.sde": "vesde",
    "training.continuous": False,
    "sampling.predictor": "none",
    "sampling.corrector": "ald",
    "model.normalization": "InstanceNorm++",
    "model.nonlinearity": "elu",
    "model.nf": 128,
    "model.interpolation": "bilinear",
    "optim.warmup": 0,
    "optim.grad_clip": -1.0,
    "optim.optimizer": "Adam",
}
NCSN_V1 = {**NCSN_ANY, "model.name": "ncsn", "model.scale_by_sigma": False, "optim.lr": 1e-3}
NCSN_V1_10 = {
    **NCSN_V1,
    "model.sigma_max": 1.0,
    "model.num_scales": 10,
    "sampling.n_steps_each": 100,
    "sampling.snr": 0.316,
}
NCSN_V2 = {**NCSN_ANY, "model.scale_by_sigma": True, "optim.lr": 1e-4}
LSUN_DDPM = {
    **VP_BASE,
    **LSUN,
    "training.sde": "vpsde",
    "training.continuous": False,
    "sampling.predictor": "ancestral_sampling",
    "model.name": "ddpm",
    "model.num_scales": 1000,
    "model.ch_mult": (1, 1, 2, 2, 4, 4),
    "model.num_res_blocks": 2,
    "model.attn_resolutions": (16,),
    "optim.lr": 2e-5,
}


def _vp(sde, continuous, arch, predictor, **extra):
    return {
        **CIFAR,
        **arch,
        "training.sde": sde,
        "training.continuous": continuous,
        "sampling.predictor": predictor,
        **extra,
    }


EXPECTED = {
    "ve/cifar10_ncsnpp_continuous.py": {**CIFAR, **NCSNPP_32, **VE_CONT},
    "ve/cifar10_ncsnpp.py": {
        **CIFAR,
        **NCSNPP_32,
        **VE_CONT,
        "training.continuous": False,
        "model.embedding_type": "positional",
    },
    "ve/cifar10_ncsnpp_deep_continuous.py": {**CIFAR, **NCSNPP_32, **VE_CONT, **DEEP},
    "ve/cifar10_ddpm.py": {
        **CIFAR,
        "training.sde": "vesde",
        "training.continuous": False,
        "model.name": "ddpm",
        "model.scale_by_sigma": True,
        "model.ema_rate": 0.999,
        "model.num_res_blocks": 2,
        "sampling.predictor": "reverse_diffusion",
        "sampling.corrector": "langevin",
    },
    "ve/celeba_ncsnpp.py": {
        **CELEBA,
        **NCSNPP_32,
        **VE_CONT,
        "training.continuous": False,
        "model.embedding_type": "positional",
    },
    "ve/bedroom_ncsnpp_continuous.py": {
        **LSUN,
        **NCSNPP_256,
        "data.dataset": "LSUN",
        "data.category": "bedroom",
    },
    "ve/church_ncsnpp_continuous.py": {
        **LSUN,
        **NCSNPP_256,
        "data.dataset": "LSUN",
        "data.category": "church_outdoor",
        "model.sigma_max": 380,
    },
    "ve/ffhq_256_ncsnpp_continuous.py": {
        **LSUN,
        **NCSNPP_256,
        "data.dataset": "FFHQ",
        "model.sigma_max": 348,
    },
    "ve/celebahq_256_ncsnpp_continuous.py": {
        **LSUN,
        **NCSNPP_256,
        "data.dataset": "CelebAHQ",
        "model.sigma_max": 348,
    },
    "ve/ffhq_ncsnpp_continuous.py": {
        **NCSNPP_1024,
        "data.dataset": "FFHQ",
        "training.reduce_mean": True,
        "training.n_jitted_steps": 2,
    },
    "ve/celebahq_ncsnpp_continuous.py": {
        **NCSNPP_1024,
        "data.dataset": "CelebAHQ",
        "training.reduce_mean": False,
        "training.n_jitted_steps": 1,
    },
    "ve/ncsn/cifar10.py": {**CIFAR, **NCSN_V1_10, "model.ema_rate": 0.0},
    "ve/ncsn/cifar10_5.py": {**CIFAR, **NCSN_V1_10, "model.ema_rate": 0.999},
    "ve/ncsn/cifar10_124.py": {
        **CIFAR,
        **NCSN_V1,
        "model.num_scales": 232,
        "model.sigma_max": 50,
        "sampling.n_steps_each": 5,
        "sampling.snr": 0.176,
        "model.ema_rate": 0.0,
    },
    "ve/ncsn/cifar10_1245.py": {
        **CIFAR,
        **NCSN_V1,
        "model.num_scales": 232,
        "model.sigma_max": 50,
        "sampling.n_steps_each": 5,
        "sampling.snr": 0.176,
        "model.ema_rate": 0.999,
    },
    "ve/ncsn/celeba.py": {**CELEBA, **NCSN_V1_10, "model.ema_rate": 0.0},
    "ve/ncsn/celeba_5.py": {**CELEBA, **NCSN_V1_10, "model.ema_rate": 0.999},
    "ve/ncsn/celeba_124.py": {
        **CELEBA,
        **NCSN_V1,
        "model.num_scales": 500,
        "model.sigma_max": 90,
        "sampling.n_steps_each": 5,
        "sampling.snr": 0.128,
        "model.ema_rate": 0.0,
    },
    "ve/ncsn/celeba_1245.py": {
        **CELEBA,
        **NCSN_V1,
        "model.num_scales": 500,
        "model.sigma_max": 90,
        "sampling.n_steps_each": 5,
        "sampling.snr": 0.128,
        "model.ema_rate": 0.999,
    },
    "ve/ncsnv2/cifar10.py": {
        **CIFAR,
        **NCSN_V2,
        "model.name": "ncsnv2_64",
        "model.num_scales": 232,
        "model.sigma_max": 50,
        "sampling.n_steps_each": 5,
        "sampling.snr": 0.176,
        "model.ema_rate": 0.999,
    },
    "ve/ncsnv2/celeba.py": {
        **CELEBA,
        **NCSN_V2,
        "model.name": "ncsnv2_64",
        "model.num_scales": 500,
        "sampling.n_steps_each": 5,
        "sampling.snr": 0.128,
        "model.ema_rate": 0.999,
    },
    "ve/ncsnv2/bedroom.py": {
        **NCSN_V2,
        "data.dataset": "LSUN",
        "data.category": "bedroom",
        "data.image_size": 128,
        "training.batch_size": 128,
        "training.n_jitted_steps": 5,
        "model.name": "ncsnv2_128",
        "model.sigma_max": 190,
        "model.sigma_min": 0.01,
        "model.num_scales": 1086,
        "model.ema_rate": 0.9999,
        "sampling.n_steps_each": 3,
        "sampling.snr": 0.095,
    },
    "vp/cifar10_ddpmpp.py": _vp("vpsde", False, DDPMPP, "ancestral_sampling"),
    "vp/cifar10_ddpmpp_continuous.py": _vp("vpsde", True, DDPMPP, "euler_maruyama"),
    "vp/cifar10_ddpmpp_deep_continuous.py": {
        **_vp("vpsde", True, DDPMPP, "euler_maruyama"),
        **DEEP,
    },
    "vp/cifar10_ncsnpp.py": _vp("vpsde", False, NCSNPP_VP, "reverse_diffusion"),
    "vp/cifar10_ncsnpp_continuous.py": _vp("vpsde", True, NCSNPP_VP, "euler_maruyama"),
    "vp/cifar10_ncsnpp_deep_continuous.py": {
        **_vp("vpsde", True, NCSNPP_VP, "euler_maruyama"),
        **DEEP,
    },
    "vp/ddpm/cifar10.py": _vp("vpsde", False, DDPM_32, "ancestral_sampling"),
    "vp/ddpm/cifar10_continuous.py": _vp("vpsde", True, DDPM_32, "euler_maruyama"),
    "vp/ddpm/cifar10_unconditional.py": _vp(
        "vpsde", False, DDPM_32, "ancestral_sampling", **{"model.conditional": False}
    ),
    "vp/ddpm/bedroom.py": {**LSUN_DDPM, "data.dataset": "LSUN", "data.category": "bedroom"},
    "vp/ddpm/church.py": {**LSUN_DDPM, "data.dataset": "LSUN", "data.category": "church_outdoor"},
    "vp/ddpm/celebahq.py": {**LSUN_DDPM, "data.dataset": "CelebAHQ"},
    "subvp/cifar10_ddpm_continuous.py": _vp("subvpsde", True, DDPM_32, "euler_maruyama"),
    "subvp/cifar10_ddpmpp_continuous.py": _vp("subvpsde", True, DDPMPP, "euler_maruyama"),
    "subvp/cifar10_ddpmpp_deep_continuous.py": {
        **_vp("subvpsde", True, DDPMPP, "euler_maruyama"),
        **DEEP,
    },
    "subvp/cifar10_ncsnpp_continuous.py": _vp("subvpsde", True, NCSNPP_VP, "euler_maruyama"),
    "subvp/cifar10_ncsnpp_deep_continuous.py": {
        **_vp("subvpsde", True, NCSNPP_VP, "euler_maruyama"),
        **DEEP,
    },
    # Project additions: the values the lead specified.
    "vp/fashion_mnist_ddpmpp_quickstart.py": {
        "data.dataset": "FashionMNIST",
        "data.image_size": 28,
        "data.num_channels": 1,
        "data.centered": True,
        "data.random_flip": False,
        "data.data_dir": "/usr/share/datasets/fashion-mnist",
        "training.sde": "vpsde",
        "training.continuous": True,
        "model.name": "ncsnpp",
        "model.nf": 16,
        "model.ch_mult": (1, 2, 2),
        "model.num_res_blocks": 1,
        "model.attn_resolutions": (7,),
        "model.resblock_type": "biggan",
        "model.fir": False,
        "model.skip_rescale": True,
        "model.embedding_type": "positional",
        "model.progressive": "none",
        "model.progressive_input": "none",
        "model.conditional": True,
        "model.dropout": 0.0,
        "model.init_scale": 0.0,
        "model.scale_by_sigma": False,
        "model.ema_rate": 0.995,
        "model.num_scales": 500,
        "training.batch_size": 32,
        "training.n_iters": 3600,
        "training.n_jitted_steps": 1,
        "optim.lr": 2e-3,
        "optim.warmup": 200,
        "optim.grad_clip": 1.0,
        "training.snapshot_freq": 1800,
        "training.snapshot_freq_for_preemption": 500,
        "training.log_freq": 100,
        "training.eval_freq": 500,
        "sampling.predictor": "euler_maruyama",
        "sampling.corrector": "none",
        "eval.batch_size": 64,
        "eval.num_samples": 64,
        "eval.bpd_num_repeats": 1,
    },
    # The template for a folder of the user's images: CelebA's 64 px VE NCSN++ (continuous).
    "ve/folder_ncsnpp_continuous.py": {
        **NCSNPP_32,
        **VE_CONT,
        "data.dataset": "folder",
        "data.data_dir": "",
        "data.image_size": 64,
        "data.num_channels": 3,
        "data.random_flip": True,
        "data.eval_fraction": 0.0,
        "data.eval_dir": "",
        "data.cache_dir": "",
        "model.sigma_max": 90.0,
        "model.num_scales": 1000,
        "sampling.snr": 0.17,
        "training.batch_size": 64,
        "training.n_iters": 500001,
        "training.snapshot_freq": 10000,
        "training.snapshot_freq_for_preemption": 5000,
        "training.eval_freq": 500,
        "eval.batch_size": 64,
    },
    "tiny_test.py": {
        "data.dataset": "FashionMNIST",
        "data.image_size": 28,
        "data.num_channels": 1,
        "training.sde": "vesde",
        "model.name": "ncsnpp",
        "model.nf": 8,
        "model.ch_mult": (1, 2),
        "model.num_res_blocks": 1,
        "model.attn_resolutions": (14,),
        "training.batch_size": 8,
        "training.n_jitted_steps": 2,
        "training.n_iters": 6,
        "training.snapshot_freq": 4,
        "training.snapshot_freq_for_preemption": 2,
        "training.eval_freq": 2,
        "training.log_freq": 2,
        "model.num_scales": 4,
        "eval.batch_size": 8,
        "eval.num_samples": 16,
    },
}

PROJECT_KEYS = {
    "data.data_dir": None,
    "data.tfrecords_path": "",
    "data.category": "",
    "eval.inception_weights": "",
    "eval.fast_fid": False,
    "eval.fast_fid_num_samples": 1000,
    "eval.num_bpd_batches": 0,
    "eval.ckpt_wait_secs": -1,
    "eval.stats_dir": "assets/stats",
    "sampling.ode_method": "dopri5",
    "sampling.ode_rtol": 1e-5,
    "sampling.ode_atol": 1e-5,
    "sampling.num_steps": 20,
    "sampling.schedule": "default",
    "sampling.rho": 7.0,
    "sampling.order": 2,
    "sampling.eta": 0.0,
    "sampling.churn": 0.0,
    "sampling.unipc_variant": "bh2",
    "sampling.ipndm_variable_steps": False,
    "eval.bpd_num_repeats": 5,
    "eval.show_progress": True,
    "training.max_ckpts_to_keep": 0,
    "data.eval_dir": "",
    "data.eval_fraction": 0.0,
    "data.cache_dir": "",
    "data.eval_split": "",
    "plugins": "",
}

# Configs that take an argument, and the reference file each argument stands for.
ARG_ALIASES = {
    **{f"ve/lsun_ncsnpp_continuous.py:{arg}": f"ve/{arg}_ncsnpp_continuous.py"
       for arg in ("bedroom", "church", "ffhq_256", "celebahq_256", "ffhq", "celebahq")},
    **{f"vp/ddpm/lsun.py:{arg}": f"vp/ddpm/{arg}.py" for arg in ("bedroom", "church", "celebahq")},
    **{f"ve/ncsn/ncsn.py:{data}{t}": f"ve/ncsn/{data}{t}.py"
       for data in ("cifar10", "celeba") for t in ("", "_5", "_124", "_1245")},
}
ALL_IDS = VARIANT_IDS + ARG_IDS


# ---------------------------------------------------------------------------------------------


def test_discovery_finds_every_reference_config():
    # The walk, not a hand list, decides what the other tests cover; this pins it to the
    # reference's file list plus the project's additions; the configs that take an
    # argument cover exactly the reference files that differ only by values.
    assert sorted(VARIANT_IDS) == sorted(EXPECTED)
    assert sorted(ARG_IDS) == sorted(ARG_ALIASES)
    assert HELPERS == ["plugins.py", "presets.py"]
    assert sorted(p.name for p in DEFAULT_PATHS) == [
        "default_celeba_configs.py",
        "default_cifar10_configs.py",
        "default_fashion_mnist_configs.py",
        "default_lsun_configs.py",
    ]


def test_every_folder_is_a_package():
    for folder in [CONFIG_DIR, *[p for p in CONFIG_DIR.rglob("*") if p.is_dir()]]:
        if folder.name == "__pycache__":
            continue
        assert (folder / "__init__.py").is_file(), folder


def test_defaults_share_one_key_set_with_project_keys():
    flats = {
        p.name: _flat(importlib.import_module(_module_name(p)).get_default_configs())
        for p in DEFAULT_PATHS
    }
    key_sets = {name: set(flat) for name, flat in flats.items()}
    first = next(iter(key_sets.values()))
    for name, keys in key_sets.items():
        assert keys == first, (name, keys ^ first)
    for name, flat in flats.items():
        for key, value in PROJECT_KEYS.items():
            assert key in flat, (name, key)
            if value is not None:
                assert flat[key] == value, (name, key, flat[key])
        expected_dir = "/usr/share/datasets/fashion-mnist" if "fashion" in name else ""
        assert flat["data.data_dir"] == expected_dir


@pytest.fixture(scope="module")
def default_keys() -> set:
    return _default_keys()


@pytest.mark.parametrize("rel", ALL_IDS)
def test_variant_structure(variants, default_keys, rel):
    _, config = variants[rel]
    assert isinstance(config, ml_collections.ConfigDict)
    for section in SECTIONS:
        assert isinstance(config[section], ml_collections.ConfigDict), section
    assert isinstance(config.seed, int)
    extra = set(_flat(config)) - default_keys
    assert not extra, f"{rel} sets keys the defaults lack: {sorted(extra)}"
    assert config.training.sde in SDES
    assert config.sampling.method in sampling.registered_samplers()  # the registry's names
    assert config.sampling.predictor in PREDICTORS
    assert config.sampling.corrector in CORRECTORS
    assert config.model.name in MODELS
    assert config.data.dataset in DATASETS
    assert config.training.batch_size % 1 == 0 and config.training.batch_size > 0
    assert config.eval.begin_ckpt <= config.eval.end_ckpt


@pytest.mark.parametrize("rel", ALL_IDS)
def test_variant_shapes_and_schedules(variants, rel):
    _, config = variants[rel]
    model, data, training = config.model, config.data, config.training
    if model.name in {"ncsnpp", "ddpm"}:
        depth = len(model.ch_mult) - 1
        assert data.image_size % 2**depth == 0, (data.image_size, model.ch_mult)
        reached = {data.image_size // 2**i for i in range(depth + 1)}
        assert set(model.attn_resolutions) <= reached, (model.attn_resolutions, reached)
    if data.dataset == "LSUN":
        assert data.category in {"bedroom", "church_outdoor"}
    if data.dataset in {"FFHQ", "CelebAHQ"}:
        assert data.image_size in {256, 1024}
    # The train loop advances n_jitted_steps at a time, so a period fires every
    # lcm(period, n_jitted_steps) steps; keep it the period itself (or every call).
    jit = training.n_jitted_steps
    for name in ("snapshot_freq", "snapshot_freq_for_preemption", "log_freq", "eval_freq"):
        assert training[name] % jit == 0 or jit % training[name] == 0, name
    if config.sampling.predictor == "ancestral_sampling":
        assert training.sde in {"vesde", "vpsde"}  # the reference has no sub-VP ancestral rule


@pytest.mark.parametrize("rel", ALL_IDS)
def test_variant_matches_reference(variants, rel):
    flat = _flat(variants[rel][1])
    for key, want in EXPECTED[ARG_ALIASES.get(rel, rel)].items():
        got = flat[key]
        if isinstance(want, float) or isinstance(got, float):
            assert got == pytest.approx(want), (key, got, want)
        else:
            assert got == want, (key, got, want)


@pytest.mark.parametrize("rel", ALL_IDS)
def test_docstring_opens_with_its_command(variants, rel):
    module, _ = variants[rel]
    first_line = module.__doc__.splitlines()[0]
    path, sep, _ = rel.partition(":")
    assert first_line.startswith(f"python main.py --mode=train --config=configs/{path}{sep}")
    assert "--workdir=workdir/" in first_line


def test_variants_are_independent_copies():
    # get_config() must build a fresh dict each call so one run's edits cannot leak.
    path = CONFIG_DIR / "ve" / "cifar10_ncsnpp_continuous.py"
    module = importlib.import_module(_module_name(path))
    a, b = module.get_config(), module.get_config()
    a.model.nf = 7
    assert b.model.nf == 128


def test_locked_config_accepts_overrides_and_rejects_typos():
    module = importlib.import_module("configs.vp.fashion_mnist_ddpmpp_quickstart")
    config = module.get_config()
    config.lock()
    config.model.nf = 16
    assert config.model.nf == 16
    with pytest.raises(AttributeError):
        config.training.continuouse = False


# ---------------------------------------------------------------------------------------------
# Regression against the snapshot of every config taken before the rebuild on presets
# (tests/fixtures/make_config_snapshots.py; values stored as repr, which keeps the type).

SNAPSHOTS = json.loads((FIXTURES / "config_snapshots.json").read_text())
# Files added after the snapshot enter it with their values when added (on the snapshot's key
# set): ve/folder_ncsnpp_continuous.py.
# Deliberate changes since the snapshot: n_jitted_steps as in the reference's files
# (default_lsun_configs: 5; the 1024 px FFHQ config: 2; the 1024 px CelebA-HQ config keeps 1).
CHANGED = {
    **{(rel, "training.n_jitted_steps"): "5" for rel in (
        "default_lsun_configs.py", "ve/bedroom_ncsnpp_continuous.py",
        "ve/church_ncsnpp_continuous.py", "ve/ffhq_256_ncsnpp_continuous.py",
        "ve/celebahq_256_ncsnpp_continuous.py", "ve/ncsnv2/bedroom.py", "vp/ddpm/bedroom.py",
        "vp/ddpm/church.py", "vp/ddpm/celebahq.py")},
    ("ve/ffhq_ncsnpp_continuous.py", "training.n_jitted_steps"): "2",
    # --mode=likelihood on a 20-image folder in about a minute (issue 26, item 11).
    ("vp/fashion_mnist_ddpmpp_quickstart.py", "eval.bpd_num_repeats"): "1",
    # The fastest sampler within 10% of the best measured on the quickstart model (issue 25).
    ("vp/fashion_mnist_ddpmpp_quickstart.py", "sampling.method"): "'sde_dpm_solver'",
    # 3,600 steps in the quickstart's 15 minutes, now that its sample grids take seconds.
    ("vp/fashion_mnist_ddpmpp_quickstart.py", "training.n_iters"): "3600",
    ("vp/fashion_mnist_ddpmpp_quickstart.py", "training.snapshot_freq"): "1800",
    # Evaluation no longer waits 24 h on a workdir no training run writes to (-1: auto).
    **{(rel, "eval.ckpt_wait_secs"): "-1" for rel in SNAPSHOTS},
}


def _repr_flat(config) -> dict:
    return {key: repr(value) for key, value in _flat(config).items()}


def _resolve(rel: str) -> ml_collections.ConfigDict:
    module = importlib.import_module(_module_name(CONFIG_DIR / rel))
    if rel.split("/")[-1].startswith("default_"):
        return module.get_default_configs()
    return module.get_config()


def test_snapshot_covers_every_config_file():
    files = {str(p.relative_to(CONFIG_DIR)) for p in DEFAULT_PATHS + VARIANT_PATHS}
    assert set(SNAPSHOTS) == files
    assert all(key in SNAPSHOTS[rel] for rel, key in CHANGED)


@pytest.mark.parametrize("rel", sorted(SNAPSHOTS))
def test_config_values_unchanged_since_snapshot(rel):
    got = _repr_flat(_resolve(rel))
    before = SNAPSHOTS[rel]
    # Keys added to the defaults after the snapshot reach every config; nothing else may be new.
    added = set(_repr_flat(_resolve("default_cifar10_configs.py"))) - set(
        SNAPSHOTS["default_cifar10_configs.py"])
    assert set(got) == (set(before) - set(REMOVED_KEYS)) | added
    for key in set(before) - set(REMOVED_KEYS):
        assert got[key] == CHANGED.get((rel, key), before[key]), (key, got[key], before[key])


def test_removed_keys_are_gone_everywhere():
    assert all(key in SNAPSHOTS["default_cifar10_configs.py"] for key in REMOVED_KEYS)
    flat_defaults = _flat(configs.project_defaults())
    for key in REMOVED_KEYS:
        assert key not in flat_defaults, key


# ---------------------------------------------------------------------------------------------
# Configs that take an argument, and the presets.


@pytest.mark.parametrize("arg_id", sorted(ARG_ALIASES))
def test_reference_file_is_its_argument(variants, arg_id):
    assert variants[arg_id][1].to_dict() == variants[ARG_ALIASES[arg_id]][1].to_dict()


@pytest.mark.parametrize("module_name", ["configs.ve.lsun_ncsnpp_continuous",
                                         "configs.vp.ddpm.lsun", "configs.ve.ncsn.ncsn"])
def test_config_argument_is_required_and_checked(module_name):
    module = importlib.import_module(module_name)
    for bad in (None, "cifar100", ""):
        with pytest.raises(ValueError, match="takes one of") as info:
            module.get_config(bad)
        for name in module.CHOICES:
            assert repr(name) in str(info.value)


def test_presets_reject_unknown_names():
    config = configs.project_defaults()
    with pytest.raises(ValueError, match="'vesde', 'vpsde', 'subvpsde'"):
        presets.sde(config, "ve")
    with pytest.raises(ValueError, match="no discrete objective"):
        presets.sde(config, "subvpsde", continuous=False)
    with pytest.raises(ValueError, match="'ncsn', 'cifar10', 'celeba', 'bedroom'"):
        presets.ncsn(config, schedule="svhn")


def test_sde_preset_recipes():
    # The recipe of each SDE as the reference configs spell it out.
    config = configs.project_defaults()
    presets.sde(config, "vpsde", continuous=False)
    assert (config.sampling.predictor, config.sampling.corrector) == ("ancestral_sampling", "none")
    assert config.training.reduce_mean and config.data.centered
    assert (config.model.scale_by_sigma, config.model.ema_rate) == (False, 0.9999)
    presets.sde(config, "subvpsde")
    assert config.sampling.predictor == "euler_maruyama" and config.training.continuous
    presets.sde(config, "vesde", continuous=False)
    assert (config.sampling.predictor, config.sampling.corrector) == ("reverse_diffusion",
                                                                      "langevin")
    assert not config.training.reduce_mean and not config.data.centered
    assert (config.model.scale_by_sigma, config.model.ema_rate) == (True, 0.999)
    assert not config.training.continuous


# ---------------------------------------------------------------------------------------------
# configs.complete on configs in the reference's format (yang-song/score_sde, resolved and
# saved by the reference code with the small-network overrides noted in the fixture).

REFERENCE_CONFIGS = json.loads((FIXTURES / "reference_configs.json").read_text())


@pytest.mark.parametrize("rel", sorted(REFERENCE_CONFIGS))
def test_complete_fills_reference_configs(rel):
    reference = REFERENCE_CONFIGS[rel]["config"]
    given = ml_collections.ConfigDict(reference)
    given.lock()
    completed = configs.complete(given)
    ref_flat, out_flat = _flat(ml_collections.ConfigDict(reference)), _flat(completed)
    default_flat = _flat(configs.project_defaults())
    for key, value in default_flat.items():
        assert key in out_flat, key
        assert out_flat[key] == ref_flat.get(key, value), key
    # Keys the project does not use are kept as they are.
    for key, value in ref_flat.items():
        assert out_flat[key] == value, key
    assert "sampling.ode_method" not in ref_flat and out_flat["sampling.ode_method"] == "dopri5"
    assert "training.sde" in ref_flat and out_flat["training.sde"] == ref_flat["training.sde"]
    # The input is untouched, and the result locked against typos.
    assert _flat(given) == ref_flat
    assert completed.is_locked
    with pytest.raises(AttributeError):
        completed.training.continuouse = False


def test_complete_keeps_unknown_keys_and_values():
    given = ml_collections.ConfigDict({"model": {"conv_size": 3, "nf": 4, "ch_mult": [1, 2]},
                                       "extra": {"a": 1}})
    completed = configs.complete(given)
    assert completed.model.conv_size == 3 and completed.extra.a == 1
    assert completed.model.nf == 4 and completed.model.ch_mult == [1, 2]
    assert completed.model.fir_kernel == [1, 3, 3, 1]  # from the CIFAR-10 default
    assert completed.optim.warmup == 5000  # a whole absent section
    assert set(given.model.keys()) == {"conv_size", "nf", "ch_mult"}
    # Each call builds new values: editing one result cannot reach the next.
    completed.optim.warmup = 1
    assert configs.complete(given).optim.warmup == 5000


def test_complete_rejects_a_value_where_the_defaults_have_a_section():
    with pytest.raises(ValueError, match="model"):
        configs.complete(ml_collections.ConfigDict({"model": 3}))


def test_complete_reads_keys_added_to_any_default(monkeypatch):
    # Keys added to a default later (a new key, a new section, a section only one dataset's
    # default has) are completed without any list in configs.complete.
    import configs.default_celeba_configs as celeba
    import configs.default_cifar10_configs as cifar10

    def cifar10_plus():
        config = original_cifar10()
        config.sampling.num_steps = 7
        config.controllable = ml_collections.ConfigDict({"snr": 0.2})
        return config

    def celeba_plus():
        config = original_celeba()
        config.only_celeba = ml_collections.ConfigDict({"x": 1})
        return config

    original_cifar10, original_celeba = cifar10.get_default_configs, celeba.get_default_configs
    monkeypatch.setattr(cifar10, "get_default_configs", cifar10_plus)
    monkeypatch.setattr(celeba, "get_default_configs", celeba_plus)
    given = ml_collections.ConfigDict(REFERENCE_CONFIGS["vp/ddpm/cifar10.py"]["config"])
    completed = configs.complete(given)
    assert completed.sampling.num_steps == 7
    assert completed.controllable.snr == 0.2
    assert completed.only_celeba.x == 1
    assert completed.sampling.predictor == "ancestral_sampling"
