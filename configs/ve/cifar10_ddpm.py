"""python main.py --mode=train --config=configs/ve/cifar10_ddpm.py \
--workdir=workdir/ve_cifar10_ddpm

Reference parameter count: 35,218,947 (the vp/ddpm/cifar10 network).

The DDPM network trained with the discrete SMLD objective (VE noise levels).
"""

from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.sde(config, "vesde", continuous=False)
    presets.ddpm(config)
    return config
