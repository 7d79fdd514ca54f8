"""python main.py --mode=train --config=configs/ve/cifar10_ncsnpp.py \
--workdir=workdir/ve_cifar10_ncsnpp

Reference parameter count: 62,693,251.

NCSN++ with the discrete SMLD objective (VE noise levels), positional embedding.
"""

from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()

    training = config.training
    training.sde = "vesde"
    training.continuous = False

    model = config.model
    model.name = "ncsnpp"
    model.embedding_type = "positional"

    return config
