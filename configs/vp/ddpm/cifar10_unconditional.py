"""python main.py --mode=train --config=configs/vp/ddpm/cifar10_unconditional.py \
--workdir=workdir/vp_ddpm_cifar10_unconditional

No reference figure.

DDPM without time conditioning of the network (NCSNv2's technique 3), discrete objective.
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
    model.conditional = False

    return config
