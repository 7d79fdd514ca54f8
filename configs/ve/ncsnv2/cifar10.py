"""python main.py --mode=train --config=configs/ve/ncsnv2/cifar10.py \
--workdir=workdir/ve_ncsnv2_cifar10

Reference parameter count: 33,970,563.

NCSNv2 (the 64 px-and-below network) with 232 noise levels up to sigma_max 50.
"""

from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.ncsnv2(config, schedule="cifar10")
    return config
