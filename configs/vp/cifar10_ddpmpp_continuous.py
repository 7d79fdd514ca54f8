"""python main.py --mode=train --config=configs/vp/cifar10_ddpmpp_continuous.py \
--workdir=workdir/vp_cifar10_ddpmpp_continuous

Reference parameter count: 61,804,419.

DDPM++ under the VP SDE, continuous objective.
"""

from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.sde(config, "vpsde", continuous=True)
    presets.ddpmpp(config)
    return config
