"""python main.py --mode=train --config=configs/subvp/cifar10_ddpm_continuous.py \
--workdir=workdir/subvp_cifar10_ddpm_continuous

Reference parameter count: 35,218,947 (the vp/ddpm/cifar10 network).

The DDPM network under the sub-VP SDE, continuous objective.
"""

from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()

    training = config.training
    training.sde = "subvpsde"
    training.continuous = True
    training.reduce_mean = True

    sampling = config.sampling
    sampling.corrector = "none"
    sampling.predictor = "euler_maruyama"

    data = config.data
    data.centered = True

    model = config.model
    model.name = "ddpm"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.num_res_blocks = 2

    return config
