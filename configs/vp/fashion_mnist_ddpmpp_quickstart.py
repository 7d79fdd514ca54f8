"""python main.py --mode=train --config=configs/vp/fashion_mnist_ddpmpp_quickstart.py \
--workdir=workdir/quickstart

Expected: recognisable Fashion-MNIST samples (sneakers, boots, trousers, bags, shirts) in
samples/iter_3600/sample.png; measured 13 min 28 s on 2 CPU cores (README).

CPU quickstart: a small DDPM++ (317,121 parameters) under the VP SDE, continuous objective,
with EDM's preconditioning (the network's data prediction stays bounded at high noise) under
the paper's loss weight and a cosine learning-rate decay: the recipe measured best in
docs/samplers.md ("The training recipe"). Sampled with SDE-DPM-Solver++(2M) at 20 score
evaluations (19 steps + the final denoising step), 25x fewer than Euler-Maruyama at 500 steps
(--config.sampling.method=pc). Not a paper configuration; numbers are for a short CPU run.
The rest of the network (ch_mult (1, 2, 2), attention at 7x7, BigGAN blocks, no FIR,
positional embedding) comes from the Fashion-MNIST default.
"""

from configs.default_fashion_mnist_configs import get_default_configs


def get_config():
    config = get_default_configs()

    # Sized for a CPU: 0.16-0.2 s per step on 2 cores (nf 16, batch 32), so 3,600 steps plus
    # compilation and two sample grids fit in 15 minutes (the few-step sampler's grids take
    # seconds). Checkpoint 2 is the last step.
    training = config.training
    training.batch_size = 32
    training.n_iters = 3600
    training.n_jitted_steps = 1  # on CPU each extra jitted step is compiled again
    training.snapshot_freq = 1800
    training.snapshot_freq_for_preemption = 500
    training.log_freq = 100
    training.eval_freq = 500

    evaluate = config.eval
    evaluate.end_ckpt = 2
    evaluate.batch_size = 64
    evaluate.num_samples = 64
    # One dequantization draw per image (the default's 5 multiply the ODE solves): bits/dim of a
    # 20-image folder with --mode=likelihood in about a minute on 2 cores.
    evaluate.bpd_num_repeats = 1

    # The fastest sampler within 10% of the best judge FID measured on this model (issue 25):
    # SDE-DPM-Solver++(2M) at 20 NFE (docs/samplers.md).
    sampling = config.sampling
    sampling.method = "sde_dpm_solver"
    sampling.num_steps = 19
    sampling.order = 2

    model = config.model
    model.num_scales = 500  # the discrete chain, and Euler-Maruyama's steps (method 'pc')
    model.nf = 16
    model.num_res_blocks = 1
    model.dropout = 0.0
    model.ema_rate = 0.995  # short run: a longer EMA would still hold the initial weights
    # EDM's preconditioning against the marginal (score_model), trained with the paper's
    # lambda = std^2: judge FID 11.66 at 20 NFE against 12.32 without it, and the deterministic
    # samplers' data prediction no longer explodes at t -> 1 (docs/samplers.md).
    model.parameterization = "edm"
    config.training.edm_weight = False

    optim = config.optim
    optim.lr = 2e-3
    optim.warmup = 200
    optim.lr_decay = "cosine"  # to 0 at training.n_iters

    # The classifier of class-conditional sampling (the default's WRN-10-2), trained in minutes:
    # python main.py --mode=train_classifier --config=<this file> --workdir=<the same workdir>
    # 3,000 steps with a cosine decay and label smoothing 0.1: 84% accurate on clean images,
    # 57% at t = 0.5 (docs/modes.md).
    classifier = config.classifier
    classifier.n_iters = 3000
    classifier.lr = 2e-3
    classifier.lr_decay = "cosine"
    classifier.label_smoothing = 0.1
    classifier.warmup = 100
    classifier.snapshot_freq = 500
    classifier.eval_freq = 500
    classifier.eval_batches = 8
    # Guidance scale of --mode=conditional, chosen by measurement (issue 25): on this config's
    # model the independent judge recognises the requested class in 87% of samples at scale 4
    # and 94% at 8 (200 samples each; docs/modes.md); the paper's scale is 1.
    config.controllable.scale = 8.0

    return config
