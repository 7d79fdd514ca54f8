"""python main.py --mode=train --config=configs/ve/ncsn/ncsn.py:cifar10_124 \
--workdir=workdir/ve_ncsn_cifar10_124

Reference parameter count: 34,428,675 for cifar10 and cifar10_5; no reference figure for the
others.

NCSN (v1, Song & Ermon 2019) and the NCSNv2 paper's ablation of it. The argument is
`<data>` or `<data>_<techniques>`, data 'cifar10' or 'celeba' (64x64), techniques of NCSNv2
(Song & Ermon, 2020) added to NCSN:

| techniques | noise levels; annealed Langevin | EMA of weights |
|---|---|---|
| (none) | 10 in [0.01, 1]; 100 steps per level, snr 0.316 | none |
| 5 | as above | 0.999 |
| 124 | NCSNv2's for the data (CIFAR-10: 232 up to 50, CelebA: 500 up to 90); 5 steps | none |
| 1245 | as 124 | 0.999 |

`configs/ve/ncsn/<arg>.py` (the reference's file names) is this file with that argument.
The reference's CelebA file set `training.loss` by mistake; this sets `training.sde`.
"""

from configs import default_celeba_configs, default_cifar10_configs, presets

_DEFAULTS = {"cifar10": default_cifar10_configs, "celeba": default_celeba_configs}
_TECHNIQUES = ("", "5", "124", "1245")
CHOICES = tuple(f"{data}_{t}" if t else data for data in _DEFAULTS for t in _TECHNIQUES)


def get_config(arg=None):
    arg = presets.choice(arg, CHOICES, "configs/ve/ncsn/ncsn.py")
    data, _, techniques = arg.partition("_")
    config = _DEFAULTS[data].get_default_configs()
    presets.ncsn(config, schedule=data if "124" in techniques else "ncsn",
                 ema="5" in techniques)
    return config
