"""python main.py --mode=train --config=configs/ve/ncsn/cifar10_124.py \
--workdir=workdir/ve_ncsn_cifar10_124

No reference figure.

NCSN (v1) with NCSNv2 techniques 1, 2, 4 (sigma_max 50, 232 levels, 5 ALD steps), no EMA.
Same as configs/ve/ncsn/ncsn.py:cifar10_124.
"""

from configs.ve.ncsn import ncsn


def get_config():
    return ncsn.get_config("cifar10_124")
