"""python main.py --mode=train --config=configs/ve/bedroom_ncsnpp_continuous.py \
--workdir=workdir/ve_bedroom_ncsnpp_continuous

Reference parameter count: 65,574,549.

256 px NCSN++, VE SDE, continuous objective, on LSUN bedroom.
"""

from configs.default_lsun_configs import get_default_configs


def get_config():
    config = get_default_configs()

    training = config.training
    training.sde = "vesde"
    training.continuous = True

    data = config.data
    data.category = "bedroom"

    model = config.model
    model.name = "ncsnpp"

    return config
