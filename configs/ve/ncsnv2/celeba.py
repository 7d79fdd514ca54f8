"""python main.py --mode=train --config=configs/ve/ncsnv2/celeba.py \
--workdir=workdir/ve_ncsnv2_celeba

No reference figure.

NCSNv2 (64 px network) on CelebA with 500 noise levels up to sigma_max 90.
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
    model.name = "ncsnv2_64"
    model.normalization = "InstanceNorm++"
    model.nonlinearity = "elu"
    model.num_scales = 500
    model.num_classes = 500  # one conditioning class per noise level

    optim = config.optim
    optim.warmup = 0
    optim.grad_clip = -1.0
    optim.lr = 1e-4

    return config
