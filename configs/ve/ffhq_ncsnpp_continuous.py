"""python main.py --mode=train --config=configs/ve/ffhq_ncsnpp_continuous.py \
--workdir=workdir/ve_ffhq_ncsnpp_continuous \
--config.data.tfrecords_path=/path/to/ffhq-r10.tfrecords

Reference parameter count: 105,785,896.

1024 px NCSN++, VE SDE, continuous objective, on FFHQ (TFRecords).
Same as configs/ve/lsun_ncsnpp_continuous.py:ffhq.
"""

from configs.ve import lsun_ncsnpp_continuous


def get_config():
    return lsun_ncsnpp_continuous.get_config("ffhq")
