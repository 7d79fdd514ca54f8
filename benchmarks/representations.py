"""Reconstruction error and time of encode then decode through the probability-flow ODE.

    python benchmarks/representations.py --workdir=workdir/quickstart

Runs --mode=encode on the first `num_images` images of `source` (default: the test split) and
--mode=decode on the latents it wrote, both in-process through run_lib with the config's ODE
solver (override with --ode_method / --rtol / --atol), into <workdir>/bench_representations/.
Prints the PSNR (dB, peak 255, over all pixels), the largest error in 8-bit levels, bits/dim
without dequantization, the latents' standard deviation, and the wall time per image of each
direction (compilation included in the first batch; `--repeat` reruns both into fresh folders
and reports the last, compiled, times). Writes <workdir>/bench_representations/summary.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import run_lib  # noqa: E402
from run_lib import decoding  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained workdir (checkpoints/).")
flags.DEFINE_string("config", "configs/vp/fashion_mnist_ddpmpp_quickstart.py", "Config file.")
flags.DEFINE_string("source", "test", "Images: 'test', 'train', a folder or an .npz.")
flags.DEFINE_integer("num_images", 64, "Images to encode and decode.")
flags.DEFINE_string("ode_method", "", "ODE method ('' = the config's).")
flags.DEFINE_float("rtol", 0.0, "ODE rtol (0 = the config's).")
flags.DEFINE_float("atol", 0.0, "ODE atol (0 = the config's).")
flags.DEFINE_string("data_dir", "", "config.data.data_dir override ('' = the config's).")
flags.DEFINE_integer("repeat", 1, "Runs; times are the last run's.")
flags.mark_flags_as_required(["workdir"])


def _config():
    spec = importlib.util.spec_from_file_location("bench_config", FLAGS.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    c, sc = config.controllable, config.sampling
    c.source, c.num_inputs = FLAGS.source, FLAGS.num_images
    sc.ode_method = FLAGS.ode_method or sc.ode_method
    sc.ode_rtol, sc.ode_atol = FLAGS.rtol or sc.ode_rtol, FLAGS.atol or sc.ode_atol
    if FLAGS.data_dir:
        config.data.data_dir = FLAGS.data_dir
    return config


def main(argv):
    del argv
    base = os.path.abspath(os.path.join(FLAGS.workdir, "bench_representations"))
    for _ in range(FLAGS.repeat):
        shutil.rmtree(base, ignore_errors=True)
        config = _config()
        config.sample.out = os.path.join(base, "encode")
        start = time.time()
        folder = run_lib.MODES["encode"](config, FLAGS.workdir, "eval")
        encode_s = time.time() - start
        latents = os.path.join(folder, "latents.npz")
        config = _config()
        config.controllable.source, config.sample.out = latents, os.path.join(base, "decode")
        start = time.time()
        out = run_lib.MODES["decode"](config, FLAGS.workdir, "eval")
        decode_s = time.time() - start
    with np.load(latents) as f:
        x, z, bpd = f["x"], f["z"], f["bpd"]
    with np.load(os.path.join(out, "samples.npz")) as f:
        samples = f["samples"]
    n = len(x)
    result = {**decoding.reconstruction_error(x, samples), "num_images": n,
              "bpd_not_dequantized": float(np.mean(bpd)), "latent_std": float(np.std(z)),
              "encode_s_per_image": encode_s / n, "decode_s_per_image": decode_s / n,
              "config": FLAGS.config, "ode_method": config.sampling.ode_method,
              "rtol": config.sampling.ode_rtol, "atol": config.sampling.ode_atol}
    with open(os.path.join(base, "summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"{n} images ({FLAGS.config}, {result['ode_method']} rtol {result['rtol']:g} atol "
          f"{result['atol']:g}): PSNR {result['psnr']:.2f} dB, max error "
          f"{result['max_error']} levels, bpd (not dequantized) "
          f"{result['bpd_not_dequantized']:.3f}, latent std {result['latent_std']:.3f}; "
          f"encode {result['encode_s_per_image']:.3f} s/image, decode "
          f"{result['decode_s_per_image']:.3f} s/image")


if __name__ == "__main__":
    app.run(main)
