"""python main.py --mode=train --config=configs/vp/cifar10_ncsnpp_deep_continuous.py \
--workdir=workdir/vp_cifar10_ncsnpp_deep_continuous

No reference figure.

Deep NCSN++ (8 residual blocks per resolution) under the VP SDE, continuous objective.
"""

from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()

    training = config.training
    training.sde = "vpsde"
    training.continuous = True
    training.reduce_mean = True
    training.n_iters = 950001

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
    model.num_res_blocks = 8

    return config
