"""python main.py --mode=train --config=configs/ve/ncsn/cifar10_5.py \
--workdir=workdir/ve_ncsn_cifar10_5

Reference parameter count: 34,428,675.

NCSN (v1) with technique 5 of NCSNv2 only (EMA of the weights).
Same as configs/ve/ncsn/ncsn.py:cifar10_5.
"""

from configs.ve.ncsn import ncsn


def get_config():
    return ncsn.get_config("cifar10_5")
