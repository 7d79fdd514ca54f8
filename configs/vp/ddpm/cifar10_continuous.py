"""python main.py --mode=train --config=configs/vp/ddpm/cifar10_continuous.py \
--workdir=workdir/vp_ddpm_cifar10_continuous

Reference parameter count: 35,218,947 (the vp/ddpm/cifar10 network).

The DDPM network under the VP SDE, continuous objective.
"""

from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.sde(config, "vpsde", continuous=True)
    presets.ddpm(config)
    return config
