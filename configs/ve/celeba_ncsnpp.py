"""python main.py --mode=train --config=configs/ve/celeba_ncsnpp.py \
--workdir=workdir/ve_celeba_ncsnpp

No reference figure.

NCSN++ with the discrete SMLD objective on CelebA 64x64 (sigma_max 90 from the default;
the reference's stray `model.sigma_begin = 90` is dropped as it duplicates it).
"""

from configs import presets
from configs.default_celeba_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.sde(config, "vesde", continuous=False)
    presets.ncsnpp(config, embedding_type="positional")
    return config
