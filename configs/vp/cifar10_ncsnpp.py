"""python main.py --mode=train --config=configs/vp/cifar10_ncsnpp.py \
--workdir=workdir/vp_cifar10_ncsnpp

Same network as vp/cifar10_ncsnpp_continuous: reference parameter count 62,693,251.

NCSN++ with the discrete DDPM objective (VP noise levels).
"""

from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.sde(config, "vpsde", continuous=False)
    presets.ncsnpp(config, embedding_type="positional")
    # The reference samples this one with the reverse-diffusion predictor, not ancestrally.
    config.sampling.predictor = "reverse_diffusion"
    return config
