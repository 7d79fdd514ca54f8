"""python main.py --mode=train --config=configs/vp/ddpm/lsun.py:church \
--workdir=workdir/vp_ddpm_church

No reference figure.

Reproduces DDPM (Ho et al., 2020) at 256x256: discrete objective, ancestral sampling, the
256 px DDPM network (ch_mult (1, 1, 2, 2, 4, 4)), lr 2e-5. The argument picks the data:
'bedroom' or 'church' (LSUN bedroom, church_outdoor) or 'celebahq' (CelebA-HQ 256 px, with
`--config.data.tfrecords_path=/path/to/celebahq-r08.tfrecords`). `configs/vp/ddpm/<arg>.py`
(the reference's file names) is this file with that argument.
"""

from configs import presets
from configs.default_lsun_configs import get_default_configs

CHOICES = {
    "bedroom": {"data.category": "bedroom"},
    "church": {"data.category": "church_outdoor"},
    "celebahq": {"data.dataset": "CelebAHQ"},
}


def get_config(arg=None):
    arg = presets.choice(arg, CHOICES, "configs/vp/ddpm/lsun.py")
    config = get_default_configs()
    presets.sde(config, "vpsde", continuous=False)
    presets.ddpm(config)
    config.model.num_scales = 1000
    config.model.ch_mult = (1, 1, 2, 2, 4, 4)
    config.optim.lr = 2e-5
    config.update_from_flattened_dict(CHOICES[arg])
    return config
