"""--mode=decode: latents back to images through the probability-flow ODE (Song et al. 2021,
Sec. 4.3, App. D): the ODE sampler started at z (times config.controllable.temperature) and
integrated from T to the encoder's start time `encoding.EPS`, without a final denoising step, so
that decode(encode(x)) = x up to the solver's tolerance (config.sampling.ode_*).

config.controllable.source is an .npz with 'z' float [N, H, W, C] (--mode=encode's
latents.npz, or latents of your own). Writes <out>/samples.npz ('samples' uint8 [N, H, W, C],
rounded to the nearest 8-bit level) and samples.png (<out> = <workdir>/decode/ckpt_<k> unless
config.sample.out). When the file also holds the inputs 'x' (uint8), summary.json reports the
reconstruction error: PSNR in dB and the largest error in 8-bit levels.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from absl import logging

import datasets
import ode
import sampling
from run_lib import encoding, files
from run_lib.batches import Run, padded, write_grid
from run_lib.build import get_score_fn
from run_lib.checks import UsageError, prepare
from run_lib.devices import gather
from run_lib.steps import program


def to_uint8(images) -> np.ndarray:
    """Images in [0, 1] -> uint8, rounded (a reconstruction, not an FID sample)."""
    return np.round(np.clip(np.asarray(images, np.float64) * 255.0, 0, 255)).astype(np.uint8)


def reconstruction_error(x: np.ndarray, y: np.ndarray) -> dict:
    """PSNR (dB, over all pixels, peak 255) and the largest absolute error in 8-bit levels."""
    diff = x.astype(np.float64) - y.astype(np.float64)
    mse = float(np.mean(diff ** 2))
    psnr = float("inf") if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)
    return {"psnr": psnr, "max_error": int(np.max(np.abs(diff))), "mse": mse}


def decode_fn(run):
    """(key, params, model_state, z [B, H, W, C]) -> images in [0, 1] [B, H, W, C]."""
    config, sc = run.config, run.config.sampling
    shape = (run.batch_size, config.data.image_size, config.data.image_size,
             config.data.num_channels)
    sampler = sampling.get_ode_sampler(
        run.sde, shape, datasets.get_data_inverse_scaler(config), denoise=False,
        rtol=sc.ode_rtol, atol=sc.ode_atol, method=sc.ode_method, eps=encoding.EPS)

    def decode(key, params, model_state, z):
        score_fn = get_score_fn(config, run.sde, run.model, params, model_state, any_time=True)
        return sampler(key, score_fn, z)[0]

    return program(decode, run.mesh, f"the probability-flow ODE decoder ({sc.ode_method})",
                   batch_args=1, host=ode.is_host_method(sc.ode_method))


def decode_latents(run, z: np.ndarray, settings: dict, desc: str = "decoding batches"):
    """uint8 images [N, H, W, C] of latents z [N, H, W, C] times controllable.temperature."""
    fn, b = decode_fn(run), run.batch_size
    temperature = float(run.config.controllable.temperature)
    order = np.arange(len(z))

    def produce(i):
        idx, real = padded(order, i * b, b)
        zb = (z[idx] * temperature).astype(np.float32)
        out = fn(run.batch_key(i), run.state.params_ema, run.state.model_state, run.shard(zb))
        return {"samples": to_uint8(files.checked_images(gather(out), f"decoded batch {i}"))
                [:real]}

    return run.run_batches(math.ceil(len(z) / b), produce, settings, desc,
                           grid_key="samples")["samples"]


def read_latents(config) -> dict:
    """The arrays of config.controllable.source, checked to hold 'z' of the model's shape."""
    path = str(config.controllable.source)
    if not (path.endswith(".npz") and os.path.isfile(path)):
        raise UsageError(f"--mode=decode reads latents: config.controllable.source={path!r} "
                         "must be an existing .npz with 'z' (e.g. --mode=encode's latents.npz)")
    with np.load(path) as f:
        arrays = {k: f[k] for k in f.files}
    want = (config.data.image_size, config.data.image_size, config.data.num_channels)
    z = arrays.get("z")
    if z is None or z.ndim != 4 or tuple(z.shape[1:]) != want or len(z) == 0:
        raise UsageError(f"{path}: needs 'z' shaped [N, {', '.join(map(str, want))}] for this "
                         f"config; found {None if z is None else tuple(z.shape)} (keys "
                         f"{sorted(arrays)})")
    return arrays


def decode(config, workdir: str, eval_folder: str = "eval") -> str:
    """Decodes the latents of config.controllable.source; returns <out>."""
    del eval_folder
    config = prepare(config, "decode", workdir)
    latents = read_latents(config)
    run = Run(config, workdir, "decode")
    settings = run.settings(source=os.path.abspath(config.controllable.source),
                            num_latents=len(latents["z"]), eps=encoding.EPS,
                            temperature=float(config.controllable.temperature))
    samples = decode_latents(run, latents["z"], settings)
    summary = {"num_images": len(samples), "ckpt": run.ckpt, "step": int(run.state.step),
               "temperature": float(config.controllable.temperature)}
    x = latents.get("x")
    if x is not None and x.shape == samples.shape:
        summary.update(reconstruction_error(x, samples))
    if files.is_chief():
        write_grid(run.folder, "samples", samples, config)
        files.atomic_write_text(os.path.join(run.folder, "summary.json"),
                                json.dumps(summary, indent=1))
    logging.info("Decoded %d latents into %s%s.", len(samples),
                 os.path.join(run.folder, "samples.npz"),
                 f"; reconstruction PSNR {summary['psnr']:.2f} dB, max error "
                 f"{summary['max_error']} levels" if "psnr" in summary else "")
    return run.folder
