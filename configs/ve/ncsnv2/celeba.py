"""python main.py --mode=train --config=configs/ve/ncsnv2/celeba.py \
--workdir=workdir/ve_ncsnv2_celeba

No reference figure.

NCSNv2 (64 px network) on CelebA with 500 noise levels up to sigma_max 90.
"""

from configs import presets
from configs.default_celeba_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.ncsnv2(config, schedule="celeba")
    return config
