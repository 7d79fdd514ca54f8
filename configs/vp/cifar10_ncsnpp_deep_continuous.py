"""python main.py --mode=train --config=configs/vp/cifar10_ncsnpp_deep_continuous.py \
--workdir=workdir/vp_cifar10_ncsnpp_deep_continuous

No reference figure.

Deep NCSN++ (8 residual blocks per resolution) under the VP SDE, continuous objective.
"""

from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.sde(config, "vpsde", continuous=True)
    presets.ncsnpp(config, embedding_type="positional", deep=True)
    return config
