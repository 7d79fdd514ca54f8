"""python main.py --mode=train --config=configs/ve/celeba_ncsnpp.py \
--workdir=workdir/ve_celeba_ncsnpp

No reference figure.

NCSN++ with the discrete SMLD objective on CelebA 64x64 (sigma_max 90 from the default;
the reference's stray `model.sigma_begin = 90` is dropped as it duplicates it).
"""

from configs.default_celeba_configs import get_default_configs


def get_config():
    config = get_default_configs()

    training = config.training
    training.sde = "vesde"
    training.continuous = False

    model = config.model
    model.name = "ncsnpp"
    model.embedding_type = "positional"

    return config
