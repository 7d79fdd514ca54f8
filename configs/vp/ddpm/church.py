"""python main.py --mode=train --config=configs/vp/ddpm/church.py \
--workdir=workdir/vp_ddpm_church

No reference figure.

Reproduces DDPM on LSUN church_outdoor 256x256: discrete objective, ancestral sampling.
Same as configs/vp/ddpm/lsun.py:church.
"""

from configs.vp.ddpm import lsun


def get_config():
    return lsun.get_config("church")
