"""--mode=data_stats: the noise schedule NCSNv2 recommends for a data set (Song & Ermon 2020,
"Improved Techniques for Training Score-Based Generative Models", Sec. 3-4), the advice the
reference's author gives for a custom data set (score_sde issue #2).

- Technique 1: sigma_max = the largest Euclidean distance between two training images, in the
  model's input space (after the data scaler). Exact over the first data_stats.max_images
  images of the train split; when the split holds more, a lower bound (`exact: false`).
- Technique 2: a geometric schedule from sigma_max to model.sigma_min whose ratio gamma makes
  Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma) = 1/2 (D = H W C);
  num_scales = ceil(log(sigma_max / sigma_min) / log gamma) + 1 (ratios at most gamma).
- Technique 4: for T = sampling.n_steps_each Langevin steps per noise scale, the step size
  eps that brings Eq. 4's variance ratio closest to 1; the corrector's step 2 (snr sigma_i)^2
  (sampling.AnnealedLangevinDynamics) equals NCSNv2's eps sigma_i^2 / sigma_L^2 for
  snr = sqrt(eps / (2 sigma_L^2)).
Writes <workdir>/data_stats.json and prints the --config overrides.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time

import jax
import numpy as np
from absl import logging

import datasets
import evaluation
from noise_scales import (  # noqa: F401
    OVERLAP,
    langevin_step,
    langevin_variance_ratio,
    max_pairwise_distance,
    noise_scale_ratio,
    num_noise_scales,
    scale_overlap,
)
from run_lib import files, inputs
from run_lib.checks import ConfigError, prepare


def _train_images(config, limit: int) -> np.ndarray:
    """Up to `limit` uint8 images of the train split, in stored order, none dropped."""
    c = copy.deepcopy(config)
    c.controllable.source, c.controllable.num_inputs = "train", limit
    # One image per host and batch, so no remainder is dropped.
    c.eval.batch_size = jax.process_count()
    return inputs.read_images(c)[0]


def data_stats(config, workdir: str, eval_folder: str = "eval") -> dict:
    """Computes the recommendations; writes <workdir>/data_stats.json and returns its dict."""
    del eval_folder
    config = prepare(config, "data_stats", workdir)
    limit = int(config.data_stats.max_images)
    if limit < 2:
        raise ConfigError(f"config.data_stats.max_images={limit} must be >= 2")
    files.check_workdir(workdir)
    start = time.time()
    images = _train_images(config, limit + 1)  # one more tells whether the split is larger
    exact = len(images) <= limit
    images = images[:limit]
    dist8, pair = max_pairwise_distance(images)
    scaler = datasets.get_data_scaler(config)
    slope = float(np.abs(np.asarray(scaler(np.float32(1.0)) - scaler(np.float32(0.0)))))
    sigma_max = dist8 / 255.0 * slope
    sigma_min = float(config.model.sigma_min)
    if not sigma_max > sigma_min:
        raise datasets.DataError(f"The largest distance between training images of "
                                 f"{config.data.dataset} is {sigma_max:g}, not above "
                                 f"config.model.sigma_min={sigma_min:g}: are they all the same?")
    dim = math.prod(images.shape[1:])
    scales = num_noise_scales(sigma_max, sigma_min, dim)
    gamma = (sigma_max / sigma_min) ** (1.0 / (scales - 1))
    steps = max(int(config.sampling.n_steps_each), 1)
    a = langevin_step(gamma, steps)
    snr = math.sqrt(a / 2.0)
    stats_path = evaluation.dataset_stats_path(config)
    overrides = (f"--config.model.sigma_max={sigma_max:.6g} --config.model.num_scales={scales} "
                 f"--config.sampling.snr={snr:.4g}")
    result = {
        "dataset": str(config.data.dataset), "num_images": len(images), "exact": exact,
        "sigma_max": sigma_max, "sigma_max_pair": list(pair), "dim": dim,
        "sigma_min": sigma_min, "num_scales": scales, "gamma": gamma,
        "gamma_target": noise_scale_ratio(dim), "overlap": scale_overlap(gamma, dim),
        "n_steps_each": steps, "langevin_step_size": a * sigma_min ** 2, "snr": snr,
        "langevin_variance_ratio": langevin_variance_ratio(a, gamma, steps),
        "fid_stats_path": stats_path, "fid_stats_exists": os.path.exists(stats_path),
        "overrides": overrides, "seconds": time.time() - start}
    if files.is_chief():
        os.makedirs(workdir, exist_ok=True)
        files.atomic_write_text(os.path.join(workdir, "data_stats.json"),
                                json.dumps(result, indent=1))
    bound = "" if exact else (f" (a lower bound: the first {len(images)} images of a larger "
                              "split; raise config.data_stats.max_images)")
    logging.info("sigma_max %.6g%s; %d noise scales; snr %.4g; FID statistics %s (%s).",
                 sigma_max, bound, scales, snr, stats_path,
                 "present" if result["fid_stats_exists"] else "absent: run --mode=fid_stats")
    print(f"Use: {overrides}", flush=True)
    return result
