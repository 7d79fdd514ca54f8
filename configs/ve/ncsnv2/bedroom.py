"""python main.py --mode=train --config=configs/ve/ncsnv2/bedroom.py \
--workdir=workdir/ve_ncsnv2_bedroom

No reference figure.

NCSNv2 (128 px network) on LSUN bedroom at 128x128, 1086 noise levels up to 190.
Discrete objective, on purpose. The reference's file sets `training.continuouse = False`
(misspelt), which adds an unused key and leaves `training.continuous` at its base config's
True: the reference runs the continuous VE objective here, so its network gets sigma(t)
(floats) as labels where NCSNv2 indexes its noise levels by integer (to divide its output by
sigma_i). This config keeps the intended discrete SMLD objective over the 1086 levels
(presets.ncsnv2), so the network gets integer indices as NCSNv2 was designed; our locked
configs reject such a misspelling. training.n_jitted_steps is the reference's 5.
"""

from configs import presets
from configs.default_lsun_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.ncsnv2(config, schedule="bedroom", network="ncsnv2_128")
    config.training.batch_size = 128
    config.data.category = "bedroom"
    config.data.image_size = 128
    config.model.ema_rate = 0.9999
    return config
