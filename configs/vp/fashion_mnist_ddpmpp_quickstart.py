"""python main.py --mode=train --config=configs/vp/fashion_mnist_ddpmpp_quickstart.py \
--workdir=workdir/vp_fashion_mnist_ddpmpp_quickstart

Expected: recognisable Fashion-MNIST samples after ~15 minutes on 2 CPU cores
(measured figure in README).

CPU quickstart: a small DDPM++ under the VP SDE, continuous objective, Euler-Maruyama
sampling with 500 steps. Not a paper configuration; numbers are for a short CPU run.
The rest of the network (ch_mult (1, 2, 2), attention at 7x7, BigGAN blocks, no FIR,
positional embedding) and the sampler come from the Fashion-MNIST default.
"""

from configs.default_fashion_mnist_configs import get_default_configs


def get_config():
    config = get_default_configs()

    training = config.training
    training.sde = "vpsde"
    training.continuous = True
    training.batch_size = 64
    training.n_iters = 4001
    training.snapshot_freq = 2000
    training.snapshot_freq_for_preemption = 500
    training.log_freq = 100
    training.eval_freq = 500

    evaluate = config.eval
    evaluate.end_ckpt = 2
    evaluate.batch_size = 64
    evaluate.num_samples = 64

    model = config.model
    model.name = "ncsnpp"
    model.num_scales = 500
    model.nf = 32
    model.num_res_blocks = 1
    model.dropout = 0.0
    model.ema_rate = 0.999

    optim = config.optim
    optim.lr = 2e-3
    optim.warmup = 200

    return config
