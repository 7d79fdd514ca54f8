"""Presets: what an SDE recipe or a network family always sets, written once.

A config file starts from its dataset default (`configs/default_*_configs.py`, whose network
is NCSN++ laid out for that resolution), applies the presets it names, then sets what is
particular to it:

    config = get_default_configs()
    presets.sde(config, "vpsde", continuous=True)
    presets.ddpmpp(config, deep=True)

Each preset edits `config` in place and only assigns keys every default defines, so a locked
config stays valid. Values follow the reference (yang-song/score_sde) and the paper
(Song et al., ICLR 2021: samplers in App. F-G, networks in App. H).
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

# Noise levels and annealed-Langevin settings (sigma_max, N, steps per level, snr). 'ncsn':
# NCSN (Song & Ermon, 2019), 10 levels in [0.01, 1]. The others: NCSNv2's (Song & Ermon, 2020)
# techniques 1 (sigma_max), 2 (N) and 4 (step size) for that dataset; 'bedroom' is 128 px.
NOISE_SCHEDULES = {
    "ncsn": dict(sigma_max=1.0, num_scales=10, n_steps_each=100, snr=0.316),
    "cifar10": dict(sigma_max=50.0, num_scales=232, n_steps_each=5, snr=0.176),
    "celeba": dict(sigma_max=90.0, num_scales=500, n_steps_each=5, snr=0.128),
    "bedroom": dict(sigma_max=190.0, num_scales=1086, n_steps_each=3, snr=0.095),
}


# The SDEs with a recipe in `sde` below (each a name of the registry, sde_lib.registered_sdes()).
_RECIPES = ("vesde", "vpsde", "subvpsde")


def choice(arg: str | None, choices: Sequence[str], config_file: str) -> str:
    """`arg` of a config file run as `--config=<config_file>:<arg>`, checked against `choices`."""
    options = list(choices)
    if arg not in options:
        raise ValueError(f"{config_file} takes one of {options} after ':' "
                         f"(e.g. --config={config_file}:{options[0]}); got {arg!r}.")
    return arg


def sde(config: ml_collections.ConfigDict, name: str, continuous: bool = True) -> None:
    """The SDE, continuous or discrete objective, and the recipe the paper pairs with it.

    VE (SMLD when discrete): summed loss, data in [0, 1], reverse-diffusion predictor with a
    Langevin corrector, network output divided by sigma, EMA 0.999. VP (DDPM when discrete)
    and sub-VP: mean loss, data in [-1, 1], Euler-Maruyama predictor (ancestral sampling for
    discrete VP), no corrector, no output scaling, EMA 0.9999. Any other SDE registered with
    `sde_lib.register_sde` (a plugin's) has no recipe here: only its name and the objective
    are set, the rest stays as the config has it.
    """
    if name not in _RECIPES:
        # Only here is the SDE registry (and JAX with it) imported: config files that name a
        # built-in load without it, so main.py answers flag errors at once.
        import sde_lib

        sde_lib.get_sde_class(name)  # ValueError listing the registered names
        config.training.sde = name
        config.training.continuous = continuous
        return
    if name == "subvpsde" and not continuous:
        raise ValueError("The sub-VP SDE has no discrete objective (discrete ones: 'vesde' "
                         "for SMLD, 'vpsde' for DDPM); use continuous=True.")
    ve = name == "vesde"
    config.training.sde = name
    config.training.continuous = continuous
    config.training.reduce_mean = not ve
    config.data.centered = not ve
    if ve:
        config.sampling.predictor = "reverse_diffusion"
    else:
        config.sampling.predictor = "euler_maruyama" if continuous else "ancestral_sampling"
    config.sampling.corrector = "langevin" if ve else "none"
    config.model.scale_by_sigma = ve
    config.model.ema_rate = 0.999 if ve else 0.9999


def _deep(config: ml_collections.ConfigDict) -> None:
    # The paper's "deep" models: twice the residual blocks, trained for fewer iterations.
    config.training.n_iters = 950001
    config.model.num_res_blocks = 8


def ncsnpp(config: ml_collections.ConfigDict, embedding_type: str = "fourier",
           deep: bool = False) -> None:
    """NCSN++ (App. H): the defaults' network, so only its name, embedding and depth are set.

    The reference uses Fourier features of sigma for VE continuous training and positional
    embeddings otherwise.
    """
    config.model.name = "ncsnpp"
    config.model.embedding_type = embedding_type
    if deep:
        _deep(config)


def ddpmpp(config: ml_collections.ConfigDict, deep: bool = False) -> None:
    """DDPM++ (App. H): the NCSN++ code without FIR resampling or progressive paths."""
    config.model.name = "ncsnpp"
    config.model.embedding_type = "positional"
    config.model.fir = False
    config.model.progressive = "none"
    config.model.progressive_input = "none"
    if deep:
        _deep(config)


def ddpm(config: ml_collections.ConfigDict) -> None:
    """The DDPM network (Ho et al., 2020): 2 residual blocks per resolution."""
    config.model.name = "ddpm"
    config.model.num_res_blocks = 2


def _annealed_langevin(config: ml_collections.ConfigDict, schedule: str) -> None:
    # What NCSN and NCSNv2 share: the discrete SMLD objective on their own noise levels,
    # annealed Langevin dynamics alone for sampling, RefineNet layers, no warmup or clipping.
    if schedule not in NOISE_SCHEDULES:
        raise ValueError(f"Unknown noise schedule {schedule!r}; valid names: "
                         f"{list(NOISE_SCHEDULES)}.")
    levels = NOISE_SCHEDULES[schedule]
    sde(config, "vesde", continuous=False)
    config.sampling.predictor = "none"
    config.sampling.corrector = "ald"
    config.sampling.n_steps_each = levels["n_steps_each"]
    config.sampling.snr = levels["snr"]
    config.model.sigma_max = levels["sigma_max"]
    config.model.num_scales = levels["num_scales"]
    config.model.normalization = "InstanceNorm++"
    config.model.nonlinearity = "elu"
    config.optim.warmup = 0
    config.optim.grad_clip = -1.0


def ncsn(config: ml_collections.ConfigDict, schedule: str = "ncsn", ema: bool = False) -> None:
    """NCSN (Song & Ermon, 2019): its RefineNet, unscaled output, lr 1e-3.

    `schedule` names a row of NOISE_SCHEDULES; `ema` keeps an EMA (0.999) of the weights
    (NCSNv2's technique 5; NCSN itself has none).
    """
    _annealed_langevin(config, schedule)
    config.model.name = "ncsn"
    config.model.scale_by_sigma = False
    config.model.ema_rate = 0.999 if ema else 0.0
    config.optim.lr = 1e-3


def ncsnv2(config: ml_collections.ConfigDict, schedule: str,
           network: str = "ncsnv2_64") -> None:
    """NCSNv2 (Song & Ermon, 2020): output divided by sigma, EMA 0.999, lr 1e-4.

    `schedule` names a row of NOISE_SCHEDULES; `network` is 'ncsnv2_64' (images up to 64 px),
    'ncsnv2_128' or 'ncsnv2_256'.
    """
    _annealed_langevin(config, schedule)
    config.model.name = network
    config.optim.lr = 1e-4
