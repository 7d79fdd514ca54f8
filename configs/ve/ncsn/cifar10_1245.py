"""python main.py --mode=train --config=configs/ve/ncsn/cifar10_1245.py \
--workdir=workdir/ve_ncsn_cifar10_1245

No reference figure.

NCSN (v1) with NCSNv2 techniques 1, 2, 4, 5 (as cifar10_124, plus EMA).
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
    model.name = "ncsn"
    model.normalization = "InstanceNorm++"
    model.nonlinearity = "elu"
    model.scale_by_sigma = False
    model.num_scales = 232
    model.num_classes = 232  # one conditioning class per noise level

    optim = config.optim
    optim.warmup = 0
    optim.grad_clip = -1.0
    optim.lr = 1e-3

    return config
