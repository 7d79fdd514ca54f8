"""python main.py --mode=train --config=configs/vp/ddpm/celebahq.py \
--workdir=workdir/vp_ddpm_celebahq \
--config.data.tfrecords_path=/path/to/celebahq-r08.tfrecords

No reference figure.

DDPM on CelebA-HQ 256x256 (TFRecords): discrete objective, ancestral sampling.
Same as configs/vp/ddpm/lsun.py:celebahq.
"""

from configs.vp.ddpm import lsun


def get_config():
    return lsun.get_config("celebahq")
