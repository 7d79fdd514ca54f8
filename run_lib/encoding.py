"""--mode=encode: images to latents through the probability-flow ODE (Song et al. 2021, Sec. 4.3
"uniquely identifiable encoding", App. D), as the reference notebook's "Representations" cell
does: the likelihood's ODE solve from EPS to T gives z = x(T) and bits/dim together.

Inputs are config.controllable.source (a split 'test' / 'train', a folder of images or an
.npz; its first controllable.num_inputs images), scaled as in training and not dequantized, so
bpd is the density at the 8-bit points themselves (the notebook's number, not the paper's
dequantized bits/dim: use --mode=likelihood for those). The solver is config.sampling's
ode_method / ode_rtol / ode_atol. Writes <out>/latents.npz (<out> = <workdir>/encode/ckpt_<k>
unless config.sample.out): 'x' uint8 [N, H, W, C] the inputs, 'z' float32 [N, H, W, C] the
latents, 'bpd' float32 [N], 'names'; and input.png. --mode=decode maps 'z' back.
"""

from __future__ import annotations

import math
import os

import numpy as np
from absl import logging

import datasets
from run_lib import files, inputs
from run_lib.batches import Run, padded, write_grid
from run_lib.build import get_likelihood_fn
from run_lib.checks import prepare
from run_lib.devices import gather

# Where the ODE starts (the likelihood's eps, as in the reference notebook); --mode=decode
# integrates back to the same time, so decoding inverts encoding up to the solver's tolerance.
EPS = 1e-5


def encode_fn(run):
    """(key, params, model_state, x [B, H, W, C] model space) -> (bpd [B], z [B, H, W, C])."""
    return get_likelihood_fn(run.config, run.sde, run.model, run.mesh,
                             f"the probability-flow ODE encoder ({run.config.sampling.ode_method})",
                             eps=EPS, latents=True)


def encode_images(run, images: np.ndarray, settings: dict, desc: str = "encoding batches"):
    """(bpd [N], z [N, H, W, C]) of uint8 images, in resumable batches of the run's folder."""
    fn, scaler, b = encode_fn(run), datasets.get_data_scaler(run.config), run.batch_size
    order = np.arange(len(images))

    def produce(i):
        idx, real = padded(order, i * b, b)
        x = scaler(images[idx].astype(np.float32) / 255.0)
        bpd, z = fn(run.batch_key(i), run.state.params_ema, run.state.model_state, run.shard(x))
        z = files.checked_images(gather(z), f"latents of batch {i}")
        return {"bpd": np.asarray(gather(bpd), np.float32)[:real],
                "z": np.asarray(z, np.float32)[:real]}

    out = run.run_batches(math.ceil(len(images) / b), produce, settings, desc)
    return out["bpd"], out["z"]


def encode(config, workdir: str, eval_folder: str = "eval") -> str:
    """Encodes config.controllable's inputs; returns <out>."""
    del eval_folder
    config = prepare(config, "encode", workdir)
    images, names = inputs.read_images(config)
    run = Run(config, workdir, "encode")
    settings = run.settings(source=config.controllable.source, num_inputs=len(images), eps=EPS)
    bpd, z = encode_images(run, images, settings)
    if files.is_chief():
        files.atomic_savez(os.path.join(run.folder, "latents.npz"), x=images, z=z, bpd=bpd,
                           names=np.asarray(names))
        write_grid(run.folder, "input", images, config)
    logging.info("Encoded %d images (bits/dim without dequantization %.4f, latent std %.4g) "
                 "into %s.", len(images), float(np.mean(bpd)), float(np.std(z)),
                 os.path.join(run.folder, "latents.npz"))
    return run.folder
