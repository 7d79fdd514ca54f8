"""Base config for CelebA (64x64x3, central crop 140 then resize); variants start from it.

Not run directly. Its values are the VE NCSN++ (continuous) setup with sigma_max 90; the
reference's CelebA NCSN++ run is
python main.py --mode=train --config=configs/ve/celeba_ncsnpp.py \
--workdir=workdir/ve_celeba_ncsnpp
(no reference figure). Same key set as every other default (see default_cifar10_configs.py).
"""

from configs.default_cifar10_configs import get_default_configs as _cifar10_defaults


def get_default_configs():
    # The CIFAR-10 default holds the full key set; this dataset overrides what differs.
    config = _cifar10_defaults()

    sampling = config.sampling
    sampling.snr = 0.17

    evaluate = config.eval
    evaluate.begin_ckpt = 1
    evaluate.enable_sampling = True

    data = config.data
    data.dataset = "CELEBA"
    data.image_size = 64

    model = config.model
    model.sigma_max = 90.0

    return config
