"""python main.py --mode=train --config=configs/ve/ffhq_256_ncsnpp_continuous.py \
--workdir=workdir/ve_ffhq_256_ncsnpp_continuous \
--config.data.tfrecords_path=/path/to/ffhq-r08.tfrecords

Reference parameter count: 65,574,549.

256 px NCSN++, VE SDE, continuous objective, on FFHQ 256 (TFRecords).
Same as configs/ve/lsun_ncsnpp_continuous.py:ffhq_256.
"""

from configs.ve import lsun_ncsnpp_continuous


def get_config():
    return lsun_ncsnpp_continuous.get_config("ffhq_256")
