"""python main.py --mode=train --config=configs/vp/ddpm/bedroom.py \
--workdir=workdir/vp_ddpm_bedroom

No reference figure.

Reproduces DDPM on LSUN bedroom 256x256: discrete objective, ancestral sampling.
Same as configs/vp/ddpm/lsun.py:bedroom.
"""

from configs.vp.ddpm import lsun


def get_config():
    return lsun.get_config("bedroom")
