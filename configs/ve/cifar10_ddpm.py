"""python main.py --mode=train --config=configs/ve/cifar10_ddpm.py \
--workdir=workdir/ve_cifar10_ddpm

Reference parameter count: 35,218,947 (the vp/ddpm/cifar10 network).

The DDPM network trained with the discrete SMLD objective (VE noise levels).
"""

from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()

    training = config.training
    training.sde = "vesde"
    training.continuous = False

    model = config.model
    model.name = "ddpm"
    model.num_res_blocks = 2

    return config
