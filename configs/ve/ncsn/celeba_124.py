"""python main.py --mode=train --config=configs/ve/ncsn/celeba_124.py \
--workdir=workdir/ve_ncsn_celeba_124

No reference figure.

NCSN (v1) on CelebA with NCSNv2 techniques 1, 2, 4 (sigma_max 90, 500 levels), no EMA.
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
    sampling.n_steps_each = 5
    sampling.snr = 0.128

    model = config.model
    model.name = "ncsn"
    model.normalization = "InstanceNorm++"
    model.nonlinearity = "elu"
    model.scale_by_sigma = False
    model.num_scales = 500
    model.num_classes = 500  # one conditioning class per noise level
    model.ema_rate = 0.0

    optim = config.optim
    optim.warmup = 0
    optim.grad_clip = -1.0
    optim.lr = 1e-3

    return config
