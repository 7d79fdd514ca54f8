"""python main.py --mode=train --config=configs/ve/cifar10_ncsnpp.py \
--workdir=workdir/ve_cifar10_ncsnpp

Reference parameter count: 62,693,251.

NCSN++ with the discrete SMLD objective (VE noise levels), positional embedding.
"""

from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.sde(config, "vesde", continuous=False)
    presets.ncsnpp(config, embedding_type="positional")
    return config
