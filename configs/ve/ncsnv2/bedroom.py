"""python main.py --mode=train --config=configs/ve/ncsnv2/bedroom.py \
--workdir=workdir/ve_ncsnv2_bedroom

No reference figure.

NCSNv2 (128 px network) on LSUN bedroom at 128x128, 1086 noise levels up to 190.
(The reference misspelt `training.continuous` here; it is set correctly below.)
"""

from configs.default_lsun_configs import get_default_configs


def get_config():
    config = get_default_configs()

    training = config.training
    training.sde = "vesde"
    training.continuous = False
    training.batch_size = 128

    sampling = config.sampling
    sampling.predictor = "none"
    sampling.corrector = "ald"
    sampling.n_steps_each = 3
    sampling.snr = 0.095

    data = config.data
    data.category = "bedroom"
    data.image_size = 128

    model = config.model
    model.name = "ncsnv2_128"
    model.normalization = "InstanceNorm++"
    model.nonlinearity = "elu"
    model.sigma_max = 190.0
    model.num_scales = 1086
    model.num_classes = 1086  # one conditioning class per noise level
    model.ema_rate = 0.9999

    optim = config.optim
    optim.warmup = 0
    optim.grad_clip = -1.0
    optim.lr = 1e-4

    return config
