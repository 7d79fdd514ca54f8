"""Base config for Fashion-MNIST (28x28x1, read from local IDX files); variants start from it.

Not run directly; the CPU quickstart is
python main.py --mode=train --config=configs/vp/fashion_mnist_ddpmpp_quickstart.py \
--workdir=workdir/quickstart
Not a paper dataset: there is no reference figure, and the values below are untuned. The model is
a small DDPM++ (NCSN++ code, no FIR, no progressive paths) under the continuous VP SDE; the
schedule is the CIFAR-10 one. Set data.dataset = 'MNIST' (and data.data_dir) for MNIST.
Same key set as every other default.
"""

from configs import presets
from configs.default_cifar10_configs import get_default_configs as _cifar10_defaults


def get_default_configs():
    # The CIFAR-10 default holds the full key set; this dataset overrides what differs.
    config = _cifar10_defaults()
    presets.sde(config, "vpsde", continuous=True)
    presets.ddpmpp(config)

    config.eval.begin_ckpt = 1

    data = config.data
    # local IDX files from the Debian package dataset-fashion-mnist
    data.data_dir = "/usr/share/datasets/fashion-mnist"
    data.dataset = "FashionMNIST"
    data.image_size = 28
    data.num_channels = 1
    data.random_flip = False

    model = config.model
    model.attn_resolutions = (7,)
    model.ch_mult = (1, 2, 2)
    model.nf = 64
    model.num_res_blocks = 2

    # A small noise-conditional WRN-10-2 classifier: Fashion-MNIST needs far less than WRN-28-10.
    classifier = config.classifier
    classifier.blocks_per_group = 1
    classifier.channel_multiplier = 2
    classifier.batch_size = 64

    return config
