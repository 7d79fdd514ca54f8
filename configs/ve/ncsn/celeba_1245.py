"""python main.py --mode=train --config=configs/ve/ncsn/celeba_1245.py \
--workdir=workdir/ve_ncsn_celeba_1245

No reference figure.

NCSN (v1) on CelebA with NCSNv2 techniques 1, 2, 4, 5 (as celeba_124, plus EMA).
Same as configs/ve/ncsn/ncsn.py:celeba_1245.
"""

from configs.ve.ncsn import ncsn


def get_config():
    return ncsn.get_config("celeba_1245")
