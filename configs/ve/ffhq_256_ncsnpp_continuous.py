"""python main.py --mode=train --config=configs/ve/ffhq_256_ncsnpp_continuous.py \
--workdir=workdir/ve_ffhq_256_ncsnpp_continuous \
--config.data.tfrecords_path=/path/to/ffhq-r08.tfrecords

Reference parameter count: 65,574,549.

256 px NCSN++, VE SDE, continuous objective, on FFHQ 256 (TFRecords).
"""

from configs.default_lsun_configs import get_default_configs


def get_config():
    config = get_default_configs()

    training = config.training
    training.sde = "vesde"
    training.continuous = True

    data = config.data
    data.dataset = "FFHQ"

    model = config.model
    model.name = "ncsnpp"
    model.sigma_max = 348.0

    return config
