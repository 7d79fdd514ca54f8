"""python main.py --mode=train --config=configs/subvp/cifar10_ddpmpp_deep_continuous.py \
--workdir=workdir/subvp_cifar10_ddpmpp_deep_continuous

Paper: NLL 2.99 bits/dim; FID 2.92 with the ODE sampler at about 60 NFE.
Reference parameter count: 106,632,579.

Deep DDPM++ (8 residual blocks per resolution) under the sub-VP SDE, continuous objective.
"""

from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.sde(config, "subvpsde", continuous=True)
    presets.ddpmpp(config, deep=True)
    return config
