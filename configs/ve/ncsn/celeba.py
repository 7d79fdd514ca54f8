"""python main.py --mode=train --config=configs/ve/ncsn/celeba.py \
--workdir=workdir/ve_ncsn_celeba

No reference figure.

NCSN (v1) on CelebA 64x64: 10 noise levels in [0.01, 1], no EMA. (The reference set
`training.loss` here by mistake; this sets `training.sde`.)
Same as configs/ve/ncsn/ncsn.py:celeba.
"""

from configs.ve.ncsn import ncsn


def get_config():
    return ncsn.get_config("celeba")
