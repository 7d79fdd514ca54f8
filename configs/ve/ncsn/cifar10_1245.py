"""python main.py --mode=train --config=configs/ve/ncsn/cifar10_1245.py \
--workdir=workdir/ve_ncsn_cifar10_1245

No reference figure.

NCSN (v1) with NCSNv2 techniques 1, 2, 4, 5 (as cifar10_124, plus EMA).
Same as configs/ve/ncsn/ncsn.py:cifar10_1245.
"""

from configs.ve.ncsn import ncsn


def get_config():
    return ncsn.get_config("cifar10_1245")
