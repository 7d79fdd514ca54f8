"""python main.py --mode=train --config=configs/ve/church_ncsnpp_continuous.py \
--workdir=workdir/ve_church_ncsnpp_continuous

Reference parameter count: 65,574,549.

256 px NCSN++, VE SDE, continuous objective, on LSUN church_outdoor.
Same as configs/ve/lsun_ncsnpp_continuous.py:church.
"""

from configs.ve import lsun_ncsnpp_continuous


def get_config():
    return lsun_ncsnpp_continuous.get_config("church")
