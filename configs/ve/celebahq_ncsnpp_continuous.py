"""python main.py --mode=train --config=configs/ve/celebahq_ncsnpp_continuous.py \
--workdir=workdir/ve_celebahq_ncsnpp_continuous \
--config.data.tfrecords_path=/path/to/celebahq-r10.tfrecords

Reference parameter count: 105,785,896.

1024 px NCSN++, VE SDE, continuous objective, on CelebA-HQ (TFRecords).
Same as configs/ve/lsun_ncsnpp_continuous.py:celebahq.
"""

from configs.ve import lsun_ncsnpp_continuous


def get_config():
    return lsun_ncsnpp_continuous.get_config("celebahq")
