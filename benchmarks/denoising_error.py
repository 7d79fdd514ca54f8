"""Where in noise a trained score model is poor: its denoising error per noise level on held-out
images, against the best linear (Gaussian) denoiser of the same data.

    JAX_PLATFORMS=cpu python benchmarks/denoising_error.py [WORKDIR] --ckpt 2 \
        --data_dir FASHION_MNIST_IDX_FOLDER --num_images 512

For x_t = alpha(t) x0 + sigma(t) z, the score model's denoiser is Tweedie's formula
x0_hat = (x_t + sigma^2 s(x_t, t)) / alpha (Song et al. 2021, Eq. 33's marginal; Efron 2011),
the data prediction every few-step sampler uses. The exact posterior mean E[x0 | x_t] has the
least mean squared error of all denoisers, so it beats in particular the best *linear* one,
the posterior mean under a Gaussian with the data's mean mu and covariance S:

    x0_lin = mu + S alpha (alpha^2 S + sigma^2 I)^-1 (x_t - alpha mu).

A model whose error exceeds x0_lin's at some noise level is worse there than a closed form
that uses two moments of the data: that is where its score, and the probability-flow ODE that
integrates it, go wrong. Per t the script prints, on `num_images` test images (and the same
number of training images, to show over-fitting), the per-pixel MSE in model space of
x0_hat, of x0_lin and of the data mean, and the ratio model / linear. The same z for every
row. Quality figures: no timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import sampler_quality as sq  # noqa: E402

import datasets  # noqa: E402
from run_lib import build  # noqa: E402

TIMES = (1e-3, 0.01, 0.03, 0.06, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def linear_denoiser(train: np.ndarray):
    """x0_lin(x_t, alpha, sigma) for data rows train [N, D] (float64): the Gaussian posterior
    mean with the data's mean and covariance, through the covariance's eigenbasis."""
    mu = train.mean(0)
    evals, evecs = np.linalg.eigh(np.cov(train, rowvar=False))
    evals = np.clip(evals, 0.0, None)

    def denoise(xt: np.ndarray, alpha: float, sigma: float) -> np.ndarray:
        r = (xt - alpha * mu) @ evecs  # [B, D] in the eigenbasis
        gain = evals * alpha / (alpha ** 2 * evals + sigma ** 2)
        return mu + (r * gain) @ evecs.T

    return mu, denoise


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", nargs="?", default=os.path.join(sq.ROOT, "workdir", "quickstart"))
    p.add_argument("--config", default=os.path.join(
        sq.ROOT, "configs", "vp", "fashion_mnist_ddpmpp_quickstart.py"))
    p.add_argument("--ckpt", type=int, default=2)
    p.add_argument("--data_dir", required=True)
    p.add_argument("--num_images", type=int, default=512)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--out", default="", help="write the rows as JSON here")
    args = p.parse_args()

    config, state = sq.restore(args)
    sde, model = build.build(config)
    score_fn = build.get_score_fn(config, sde, model, state.params_ema, state.model_state,
                                  any_time=True)
    scaler = datasets.get_data_scaler(config)

    def to_model_space(images):  # uint8 [N, H, W, C] -> float64 [N, D]
        x = np.asarray(scaler(images.astype(np.float32) / 255.0), np.float64)
        return x.reshape(len(x), -1)

    train_all = to_model_space(sq.read_split(args.data_dir, "train"))
    mu, x0_lin = linear_denoiser(train_all)
    rng = np.random.default_rng(0)
    held_out = to_model_space(sq.read_split(args.data_dir, "t10k")[:args.num_images])
    seen = train_all[rng.choice(len(train_all), args.num_images, replace=False)]
    shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    z = rng.standard_normal(held_out.shape)

    @jax.jit
    def model_x0(xt, t):
        alpha, sigma = sde.marginal_coefficients(t)
        s = score_fn(xt, t)
        return (xt + (sigma ** 2)[:, None, None, None] * s) / alpha[:, None, None, None]

    def model_mse(x0, xt, t):
        out = []
        for i in range(0, len(x0), args.batch):
            xb = jnp.asarray(xt[i:i + args.batch].reshape(-1, *shape), jnp.float32)
            tb = jnp.full((xb.shape[0],), t, jnp.float32)
            out.append(np.asarray(model_x0(xb, tb), np.float64).reshape(len(xb), -1))
        return float(np.mean((np.concatenate(out) - x0) ** 2))

    rows = []
    print(f"{'t':>6} {'alpha':>7} {'sigma':>7} | {'model':>8} {'linear':>8} {'mean':>8} "
          f"{'model/lin':>9} | train: {'model':>8} {'linear':>8}")
    for t in TIMES:
        alpha, sigma = (float(v) for v in sde.marginal_coefficients(jnp.float32(t)))
        row = {"t": t, "alpha": alpha, "sigma": sigma}
        for name, x0 in (("test", held_out), ("train", seen)):
            xt = alpha * x0 + sigma * z
            row[f"{name}_model"] = model_mse(x0, xt, t)
            row[f"{name}_linear"] = float(np.mean((x0_lin(xt, alpha, sigma) - x0) ** 2))
            row[f"{name}_mean"] = float(np.mean((mu - x0) ** 2))
        rows.append(row)
        print(f"{t:6.3f} {alpha:7.4f} {sigma:7.4f} | {row['test_model']:8.5f} "
              f"{row['test_linear']:8.5f} {row['test_mean']:8.5f} "
              f"{row['test_model'] / row['test_linear']:9.3f} | train: "
              f"{row['train_model']:8.5f} {row['train_linear']:8.5f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"workdir": args.workdir, "ckpt": args.ckpt, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
