"""python main.py --mode=train --config=configs/vp/cifar10_ddpmpp_deep_continuous.py \
--workdir=workdir/vp_cifar10_ddpmpp_deep_continuous

Paper: FID 2.41 (Euler-Maruyama, 1000 NFE). Reference parameter count: 106,632,579.

Deep DDPM++ (8 residual blocks per resolution) under the VP SDE, continuous objective.
"""

from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.sde(config, "vpsde", continuous=True)
    presets.ddpmpp(config, deep=True)
    return config
