"""python main.py --mode=train --config=configs/vp/ddpm/cifar10_continuous.py \
--workdir=workdir/vp_ddpm_cifar10_continuous

Reference parameter count: 35,218,947 (the vp/ddpm/cifar10 network).

The DDPM network under the VP SDE, continuous objective.
"""

from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()

    training = config.training
    training.sde = "vpsde"
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
