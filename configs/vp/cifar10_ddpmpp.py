"""python main.py --mode=train --config=configs/vp/cifar10_ddpmpp.py \
--workdir=workdir/vp_cifar10_ddpmpp

Reference parameter count: 61,804,419.

DDPM++ (NCSN++ code without FIR or progressive paths) with the discrete DDPM objective.
"""

from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.sde(config, "vpsde", continuous=False)
    presets.ddpmpp(config)
    return config
