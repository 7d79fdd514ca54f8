"""python main.py --mode=train --config=configs/vp/ddpm/cifar10_unconditional.py \
--workdir=workdir/vp_ddpm_cifar10_unconditional

No reference figure.

DDPM without time conditioning of the network (NCSNv2's technique 3), discrete objective.
"""

from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.sde(config, "vpsde", continuous=False)
    presets.ddpm(config)
    config.model.conditional = False
    return config
