"""python main.py --mode=train --config=configs/subvp/cifar10_ddpmpp_continuous.py \
--workdir=workdir/subvp_cifar10_ddpmpp_continuous

Reference parameter count: 61,804,419.

DDPM++ under the sub-VP SDE, continuous objective.
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
    model.name = "ncsnpp"
    model.scale_by_sigma = False
    model.ema_rate = 0.9999
    model.embedding_type = "positional"
    model.fir = False
    model.progressive_input = "none"

    return config
