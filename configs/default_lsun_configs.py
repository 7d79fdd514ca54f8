"""Base config for 256x256 data: LSUN, and FFHQ / CelebA-HQ (TFRecords); variants start from it.

Not run directly (set data.category for LSUN or data.tfrecords_path for FFHQ / CelebA-HQ). Its
values are the 256 px VE NCSN++ (continuous) setup, as in
python main.py --mode=train --config=configs/ve/bedroom_ncsnpp_continuous.py \
--workdir=workdir/ve_bedroom_ncsnpp_continuous
(65,574,549 parameters in the reference). The 1024 px configs also start here, as the
reference's 256 px FFHQ / CelebA-HQ configs do; so "lsun" in a config name
(ve/lsun_ncsnpp_continuous.py, vp/ddpm/lsun.py) means this family. Same key set as every
other default.
"""

from configs.default_cifar10_configs import get_default_configs as _cifar10_defaults


def get_default_configs():
    # The CIFAR-10 default holds the full key set; this dataset overrides what differs.
    config = _cifar10_defaults()

    training = config.training
    training.batch_size = 64
    training.n_iters = 2400001
    training.snapshot_freq_for_preemption = 5000

    sampling = config.sampling
    sampling.snr = 0.075

    evaluate = config.eval
    evaluate.batch_size = 512
    evaluate.begin_ckpt = 50
    evaluate.enable_sampling = True
    evaluate.end_ckpt = 96

    data = config.data
    data.dataset = "LSUN"
    data.image_size = 256

    model = config.model
    model.ch_mult = (1, 1, 2, 2, 2, 2, 2)
    model.dropout = 0.0
    model.num_res_blocks = 2
    model.num_scales = 2000
    model.progressive = "output_skip"
    model.progressive_input = "input_skip"
    model.sigma_max = 378.0

    return config
