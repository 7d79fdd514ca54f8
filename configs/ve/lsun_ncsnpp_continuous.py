"""python main.py --mode=train --config=configs/ve/lsun_ncsnpp_continuous.py:church \
--workdir=workdir/ve_church_ncsnpp_continuous

NCSN++, VE SDE, continuous objective, on the default_lsun_configs family. The argument picks
the data; `configs/ve/<arg>_ncsnpp_continuous.py` (the reference's file names) is this file
with that argument.

| arg | data | reference parameters |
|---|---|---|
| bedroom | LSUN bedroom 256 px, sigma_max 378 | 65,574,549 |
| church | LSUN church_outdoor 256 px, sigma_max 380 | 65,574,549 |
| ffhq_256 | FFHQ 256 px (TFRecords), sigma_max 348 | 65,574,549 |
| celebahq_256 | CelebA-HQ 256 px (TFRecords), sigma_max 348 | 65,574,549 |
| ffhq | FFHQ 1024 px (TFRecords) | 105,785,896 |
| celebahq | CelebA-HQ 1024 px (TFRecords) | 105,785,896 |

FFHQ and CelebA-HQ read `--config.data.tfrecords_path=/path/to/<name>-r08.tfrecords` (256 px)
or `-r10.tfrecords` (1024 px). The reference wrote the 1024 px configs out in full; here they
start from the 256 px default. Their n_jitted_steps (2 for FFHQ, 1 for CelebA-HQ; 5 elsewhere)
and FFHQ's mean loss are the reference's.
"""

from configs import presets
from configs.default_lsun_configs import get_default_configs

_1024_PX = {
    "data.image_size": 1024,
    "training.batch_size": 8,
    "sampling.snr": 0.15,
    "eval.begin_ckpt": 1,
    "eval.batch_size": 1024,
    "model.sigma_max": 1348.0,
    "model.ema_rate": 0.9999,
    "model.nf": 16,
    "model.ch_mult": (1, 2, 4, 8, 16, 32, 32, 32),
    "model.num_res_blocks": 1,
}
CHOICES = {
    "bedroom": {"data.category": "bedroom"},
    "church": {"data.category": "church_outdoor", "model.sigma_max": 380.0},
    "ffhq_256": {"data.dataset": "FFHQ", "model.sigma_max": 348.0},
    "celebahq_256": {"data.dataset": "CelebAHQ", "model.sigma_max": 348.0},
    "ffhq": {**_1024_PX, "data.dataset": "FFHQ", "training.reduce_mean": True,
             "training.n_jitted_steps": 2},
    "celebahq": {**_1024_PX, "data.dataset": "CelebAHQ", "training.n_jitted_steps": 1},
}


def get_config(arg=None):
    arg = presets.choice(arg, CHOICES, "configs/ve/lsun_ncsnpp_continuous.py")
    config = get_default_configs()
    presets.sde(config, "vesde", continuous=True)
    presets.ncsnpp(config)
    config.update_from_flattened_dict(CHOICES[arg])
    return config
