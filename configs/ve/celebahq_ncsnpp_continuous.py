"""python main.py --mode=train --config=configs/ve/celebahq_ncsnpp_continuous.py \
--workdir=workdir/ve_celebahq_ncsnpp_continuous \
--config.data.tfrecords_path=/path/to/celebahq-r10.tfrecords

Reference parameter count: 105,785,896.

1024 px NCSN++, VE SDE, continuous objective, on CelebA-HQ (TFRecords). The reference
wrote this config out in full; here it starts from the 256 px default.
"""

from configs.default_lsun_configs import get_default_configs


def get_config():
    config = get_default_configs()

    training = config.training
    training.sde = "vesde"
    training.continuous = True
    training.batch_size = 8

    sampling = config.sampling
    sampling.snr = 0.15

    evaluate = config.eval
    evaluate.begin_ckpt = 1
    evaluate.batch_size = 1024

    data = config.data
    data.dataset = "CelebAHQ"
    data.image_size = 1024

    model = config.model
    model.name = "ncsnpp"
    model.sigma_max = 1348.0
    model.ema_rate = 0.9999
    model.nf = 16
    model.ch_mult = (1, 2, 4, 8, 16, 32, 32, 32)
    model.num_res_blocks = 1

    return config
