"""python main.py --mode=train --config=configs/ve/folder_ncsnpp_continuous.py \
--workdir=workdir/folder --config.data.data_dir=/path/to/your/images

Expected: no reference figure (your own images): sample grids in workdir/folder/samples/ at
every snapshot; the paper's CelebA 64 px runs (the same network) train for 1.3M steps.

A template for your own images: the VE SDE with the continuous objective and NCSN++ laid out
for 64 x 64 (the CelebA network of default_celeba_configs.py). The images are PNG, JPEG or WebP
files found recursively under data_dir (or one .npz with key 'images', optional 'labels'); each
is resized on its shorter side and centre-cropped to data.image_size, made RGB (or grey with
--config.data.num_channels=1) and decoded once into <workdir>/data_cache (docs/data.md).
First-level subfolders, if any, are classes.

1. Statistics of the data (NCSNv2's Techniques 1, 2 and 4): sigma_max = the largest distance
   between two training images, the number of noise scales and the Langevin snr:

     python main.py --mode=data_stats --config=configs/ve/folder_ncsnpp_continuous.py \
       --workdir=workdir/folder --config.data.data_dir=/path/to/your/images

   It writes workdir/folder/data_stats.json and prints the overrides to use, e.g.
   --config.model.sigma_max=... --config.model.num_scales=... --config.sampling.snr=...
   (the values below, CelebA's 90 / 1000 / 0.17, are only a starting point).

2. Train, with those overrides (checkpoints every 10k steps, sample grids in samples/):

     python main.py --mode=train --config=configs/ve/folder_ncsnpp_continuous.py \
       --workdir=workdir/folder --config.data.data_dir=/path/to/your/images \
       --config.model.sigma_max=<from step 1> --config.model.num_scales=<from step 1>

   Hold images out for the evaluation loss with --config.data.eval_fraction=0.05 (or give a
   separate folder: --config.data.eval_dir=...).

3. Sample from the newest checkpoint (writes workdir/folder/sample/ckpt_<k>/samples.npz and
   a grid), with the same overrides:

     python main.py --mode=sample --config=configs/ve/folder_ncsnpp_continuous.py \
       --workdir=workdir/folder --config.data.data_dir=/path/to/your/images \
       --config.sample.num_samples=64

   With class subfolders, --mode=train_classifier and then --mode=conditional (both with
   --config.classifier.num_classes=<number of subfolders>) sample chosen classes.

Memory (score_sde #1 / #71 are out-of-memory reports on 128 px data): the activations grow
with batch x image_size^2. For 128 px and more (--config.data.image_size=128) add a level to
the network (--config.model.ch_mult="(1, 1, 2, 2, 2)"), lower the batch
(--config.training.batch_size=32 or 16), and use --config.training.precision=bfloat16 and
--config.training.remat=True (less activation memory for one more forward pass); sigma_max
grows with the image size (rerun step 1 at the new size).
"""

from configs import presets
from configs.default_celeba_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.sde(config, "vesde", continuous=True)

    data = config.data
    data.dataset = "folder"
    data.data_dir = ""  # required: --config.data.data_dir=/path/to/your/images (or .npz)
    data.image_size = 64
    data.num_channels = 3
    data.random_flip = True

    # Checkpoints and evaluation sized for a run of a few 100k steps on one GPU.
    training = config.training
    training.batch_size = 64
    training.n_iters = 500001
    training.snapshot_freq = 10000
    training.snapshot_freq_for_preemption = 5000
    training.eval_freq = 500

    evaluate = config.eval
    evaluate.batch_size = 64
    evaluate.num_samples = 1000
    evaluate.enable_sampling = False
    return config
