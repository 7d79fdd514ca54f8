"""python main.py --mode=train --config=configs/ve/ncsn/cifar10.py \
--workdir=workdir/ve_ncsn_cifar10

Reference parameter count: 34,428,675.

NCSN (v1): 10 noise levels in [0.01, 1], annealed Langevin dynamics, no EMA.
Same as configs/ve/ncsn/ncsn.py:cifar10.
"""

from configs.ve.ncsn import ncsn


def get_config():
    return ncsn.get_config("cifar10")
