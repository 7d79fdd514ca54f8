"""python main.py --mode=train --config=configs/ve/ncsnv2/cifar10.py \
--workdir=workdir/ve_ncsnv2_cifar10

Reference parameter count: 33,970,563.

NCSNv2 (the 64 px-and-below network) with 232 noise levels up to sigma_max 50.
"""

from configs.default_cifar10_configs import get_default_configs


def get_config():
    config = get_default_configs()

    training = config.training
    training.sde = "vesde"
    training.continuous = False

    sampling = config.sampling
    sampling.predictor = "none"
    sampling.corrector = "ald"
    sampling.n_steps_each = 5
    sampling.snr = 0.176

    model = config.model
    model.name = "ncsnv2_64"
    model.normalization = "InstanceNorm++"
    model.nonlinearity = "elu"
    model.num_scales = 232
    model.num_classes = 232  # one conditioning class per noise level

    optim = config.optim
    optim.warmup = 0
    optim.grad_clip = -1.0
    optim.lr = 1e-4

    return config
