"""python main.py --mode=train --config=configs/tiny_test.py \
--workdir=workdir/tiny_test

Expected: nothing meaningful; it exists so end-to-end tests run in seconds on a CPU.

A few-step VE NCSN++ run on Fashion-MNIST with an 8-filter network (tests only).
"""

from configs import presets
from configs.default_fashion_mnist_configs import get_default_configs


def get_config():
    config = get_default_configs()
    presets.sde(config, "vesde", continuous=True)

    training = config.training
    training.batch_size = 8
    training.n_iters = 6
    training.n_jitted_steps = 2
    training.snapshot_freq = 4
    training.snapshot_freq_for_preemption = 2
    training.eval_freq = 2
    training.log_freq = 2

    evaluate = config.eval
    evaluate.end_ckpt = 1
    evaluate.batch_size = 8
    evaluate.num_samples = 16

    # The default's small DDPM++ layout, shrunk, with the VE SDE's Fourier embedding.
    model = config.model
    model.num_scales = 4
    model.embedding_type = "fourier"
    model.ema_rate = 0.9999  # kept from the Fashion-MNIST default (the VE preset sets 0.999)
    model.nf = 8
    model.ch_mult = (1, 2)
    model.num_res_blocks = 1
    model.attn_resolutions = (14,)
    model.dropout = 0.0

    # No warmup, so that a handful of steps visibly moves the parameters.
    optim = config.optim
    optim.lr = 1e-3
    optim.warmup = 0

    # A WRN-10-1 classifier trained for a few steps (--mode=train_classifier / conditional).
    classifier = config.classifier
    classifier.channel_multiplier = 1
    classifier.batch_size = 8
    classifier.n_iters = 6
    classifier.snapshot_freq = 3
    classifier.log_freq = 2
    classifier.eval_freq = 3
    classifier.eval_batches = 1
    classifier.lr = 1e-3
    classifier.warmup = 0

    # Small outputs for the generating modes.
    config.sample.num_samples = 16
    config.controllable.num_inputs = 8

    return config
