"""--mode=likelihood: bits/dim of a user's images (or a split) through the probability-flow ODE
(Song et al. 2021, Sec. 4.3, App. D.2), in resumable batches (`run_lib.batches`); the bits/dim
program is --mode=eval's (`run_lib.build.get_bpd_fn`)."""

from __future__ import annotations

import csv
import json
import os

import jax
import numpy as np
from absl import logging

import datasets
from run_lib import files, inputs
from run_lib.batches import Run, padded
from run_lib.build import get_bpd_fn
from run_lib.checks import prepare
from run_lib.devices import gather
from run_lib.interrupt import Interrupted, interrupted


def likelihood_mode(config, workdir: str, eval_folder: str = "eval") -> dict:
    """Bits/dim of the images config.controllable.source names (a user's folder or .npz, or a
    split), through the probability-flow ODE on uniformly dequantized data (App. D.2).

    Each image's value is the mean over eval.bpd_num_repeats draws of dequantization noise and
    Hutchinson probes. Writes <out>/bpd.npz ('bpd' [N], 'bpd_repeats' [R, N], 'names'),
    <out>/bpd.csv and <out>/summary.json; prints the mean and its standard error.
    """
    del eval_folder
    config = prepare(config, "likelihood", workdir)
    images, names = inputs.read_images(config)
    run = Run(config, workdir, "likelihood")
    b, n, repeats = run.batch_size, len(images), int(config.eval.bpd_num_repeats)
    scaler = datasets.get_data_scaler(config)
    bpd_fn = get_bpd_fn(config, run.sde, run.model, run.mesh)
    order, sizes = np.arange(n), run.sizes(n)

    def produce(i):
        idx, real = padded(order, i * b, run.computed_size(sizes[i]))
        values = []
        for r in range(repeats):
            if r and interrupted():
                raise Interrupted(f"Interrupted after {r} of {repeats} draws")
            noise_key, probe_key = jax.random.split(jax.random.fold_in(run.batch_key(i), r))
            # Uniform dequantization: (k + U) / 256 for the 8-bit value k.
            u = np.asarray(jax.random.uniform(noise_key, images[idx].shape))
            x = scaler((images[idx].astype(np.float32) + u) / 256.0)
            bpd = gather(bpd_fn(probe_key, run.state.params_ema, run.state.model_state,
                                run.shard(x)))
            values.append(np.asarray(bpd)[:real])
        return {"bpd": np.stack(values, axis=1)}  # [b, R]

    settings = run.settings(source=config.controllable.source, num_inputs=n, repeats=repeats)
    per_repeat = run.run_batches(len(sizes), produce, settings, "bits/dim batches",
                                 sizes=sizes)["bpd"]
    bpd = per_repeat.mean(axis=1)
    mean = float(np.mean(bpd))
    stderr = float(np.std(bpd, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    if files.is_chief():
        _write_bpd(run.folder, bpd, per_repeat, names, mean, stderr, run)
    line = (f"bits/dim: {mean:.4f} +- {stderr:.4f} (standard error of the mean over {n} images, "
            f"{repeats} dequantization draw(s) each; checkpoint_{run.ckpt})")
    logging.info("%s; per image: %s", line, os.path.join(run.folder, "bpd.csv"))
    print(line, flush=True)
    return {"bpd": mean, "stderr": stderr, "num_images": n}


def _write_bpd(folder, bpd, per_repeat, names, mean, stderr, run):
    files.atomic_savez(os.path.join(folder, "bpd.npz"), bpd=bpd, bpd_repeats=per_repeat.T,
                       names=np.asarray(names))
    tmp = os.path.join(folder, f"bpd.csv.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["name", "bpd"])
        writer.writerows((name, f"{value:.6f}") for name, value in zip(names, bpd, strict=True))
    os.replace(tmp, os.path.join(folder, "bpd.csv"))
    files.atomic_write_text(os.path.join(folder, "summary.json"), json.dumps(
        {"bpd": mean, "stderr": stderr, "num_images": len(bpd), "ckpt": run.ckpt,
         "step": int(run.state.step), "source": run.config.controllable.source}, indent=2))
