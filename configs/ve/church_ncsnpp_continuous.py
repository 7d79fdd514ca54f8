"""python main.py --mode=train --config=configs/ve/church_ncsnpp_continuous.py \
--workdir=workdir/ve_church_ncsnpp_continuous

Reference parameter count: 65,574,549.

256 px NCSN++, VE SDE, continuous objective, on LSUN church_outdoor.
"""

from configs.default_lsun_configs import get_default_configs


def get_config():
    config = get_default_configs()

    training = config.training
    training.sde = "vesde"
    training.continuous = True

    data = config.data
    data.category = "church_outdoor"

    model = config.model
    model.name = "ncsnpp"
    model.sigma_max = 380.0

    return config
