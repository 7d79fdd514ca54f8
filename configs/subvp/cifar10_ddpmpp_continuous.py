"""python main.py --mode=train --config=configs/subvp/cifar10_ddpmpp_continuous.py \
--workdir=workdir/subvp_cifar10_ddpmpp_continuous

Reference parameter count: 61,804,419.

DDPM++ under the sub-VP SDE, continuous objective.
"""

from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.sde(config, "subvpsde", continuous=True)
    presets.ddpmpp(config)
    return config
