"""python main.py --mode=train --config=configs/ve/ncsn/celeba_5.py \
--workdir=workdir/ve_ncsn_celeba_5

No reference figure.

NCSN (v1) on CelebA with technique 5 of NCSNv2 only (EMA of the weights).
Same as configs/ve/ncsn/ncsn.py:celeba_5.
"""

from configs.ve.ncsn import ncsn


def get_config():
    return ncsn.get_config("celeba_5")
