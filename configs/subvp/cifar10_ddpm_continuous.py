"""python main.py --mode=train --config=configs/subvp/cifar10_ddpm_continuous.py \
--workdir=workdir/subvp_cifar10_ddpm_continuous

Reference parameter count: 35,218,947 (the vp/ddpm/cifar10 network).

The DDPM network under the sub-VP SDE, continuous objective.
"""

from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.sde(config, "subvpsde", continuous=True)
    presets.ddpm(config)
    return config
