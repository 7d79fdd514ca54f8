"""python main.py --mode=train --config=configs/ve/ncsn/celeba_124.py \
--workdir=workdir/ve_ncsn_celeba_124

No reference figure.

NCSN (v1) on CelebA with NCSNv2 techniques 1, 2, 4 (sigma_max 90, 500 levels), no EMA.
Same as configs/ve/ncsn/ncsn.py:celeba_124.
"""

from configs.ve.ncsn import ncsn


def get_config():
    return ncsn.get_config("celeba_124")
