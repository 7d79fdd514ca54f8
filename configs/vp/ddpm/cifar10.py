"""python main.py --mode=train --config=configs/vp/ddpm/cifar10.py \
--workdir=workdir/vp_ddpm_cifar10

Reference parameter count: 35,218,947.

Reproduces DDPM (Ho et al. 2020): discrete objective, ancestral sampling.
"""

from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()

    training = config.training
    training.sde = "vpsde"
    training.continuous = False
    training.reduce_mean = True

    sampling = config.sampling
    sampling.corrector = "none"
    sampling.predictor = "ancestral_sampling"

    data = config.data
    data.centered = True

    model = config.model
    model.name = "ddpm"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.num_res_blocks = 2

    return config
