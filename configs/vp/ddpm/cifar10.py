"""python main.py --mode=train --config=configs/vp/ddpm/cifar10.py \
--workdir=workdir/vp_ddpm_cifar10

Reference parameter count: 35,218,947.

Reproduces DDPM (Ho et al. 2020): discrete objective, ancestral sampling.
"""

from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.sde(config, "vpsde", continuous=False)
    presets.ddpm(config)
    return config
