"""python main.py --mode=train --config=configs/ve/ncsn/celeba.py \
--workdir=workdir/ve_ncsn_celeba

No reference figure.

NCSN (v1) on CelebA 64x64: 10 noise levels in [0.01, 1], no EMA. (The reference set
`training.loss` here by mistake; this sets `training.sde`.)
"""

from configs.default_celeba_configs import get_default_configs


def get_config():
    config = get_default_configs()

    training = config.training
    training.sde = "vesde"
    training.continuous = False

    sampling = config.sampling
    sampling.predictor = "none"
    sampling.corrector = "ald"
    sampling.n_steps_each = 100
    sampling.snr = 0.316

    model = config.model
    model.name = "ncsn"
    model.normalization = "InstanceNorm++"
    model.nonlinearity = "elu"
    model.scale_by_sigma = False
    model.sigma_max = 1.0
    model.num_scales = 10
    model.num_classes = 10  # one conditioning class per noise level
    model.ema_rate = 0.0

    optim = config.optim
    optim.warmup = 0
    optim.grad_clip = -1.0
    optim.lr = 1e-3

    return config
