"""--mode=sample: config.sample.num_samples images from the sampler config.sampling names, in
resumable batches (`run_lib.batches`: checkpoint, output folder, batches).

The shared machinery and --mode=likelihood (`run_lib.bits_per_dim`) keep their names here too.
"""

from __future__ import annotations

import os

import numpy as np
from absl import logging

from evaluation import images_to_uint8
from run_lib import files
from run_lib.batches import (
    Run,
    batch_sizes,
    computed_size,
    load_checkpoint,
    output_folder,
    padded,
    run_batches,
    sampler_tag,
    write_grid,
)
from run_lib.bits_per_dim import likelihood_mode
from run_lib.build import get_sample_fn
from run_lib.checks import prepare
from run_lib.devices import gather

__all__ = ["Run", "batch_sizes", "computed_size", "likelihood_mode", "load_checkpoint",
           "output_folder", "padded", "run_batches", "sample", "sampler_tag", "write_grid"]


def sample(config, workdir: str, eval_folder: str = "eval") -> str:
    """config.sample.num_samples images from the sampler config.sampling names.

    Writes <out>/samples.npz ('samples': uint8 [N, H, W, C]), <out>/samples.png (a grid of
    the first sample.grid_size) and the batches; returns <out>.
    """
    del eval_folder
    config = prepare(config, "sample", workdir)
    run = Run(config, workdir, "sample")
    n = int(config.sample.num_samples)
    sizes, sample_fns, nfes = run.sizes(n), {}, []

    def produce(i):
        size = run.computed_size(sizes[i])
        if size not in sample_fns:  # a second program for a short last batch
            shape = (size, config.data.image_size, config.data.image_size,
                     config.data.num_channels)
            sample_fns[size] = get_sample_fn(config, run.sde, run.model, shape, run.mesh)
        images, nfe = sample_fns[size](run.batch_key(i), run.state.params_ema,
                                       run.state.model_state)
        nfes.append(int(nfe))
        images = files.checked_images(gather(images), f"samples of batch {i}")[:sizes[i]]
        return {"samples": images_to_uint8(images)}

    out = run_batches(run.folder, len(sizes), produce, run.settings(sampler=sampler_tag(config)),
                      "sampling batches", config.eval.show_progress, "samples", sizes)
    samples = out["samples"][:n]
    if files.is_chief():
        write_grid(run.folder, "samples", samples, config)
    logging.info("Wrote %d samples (%s) to %s%s.", len(samples), config.sampling.method,
                 os.path.join(run.folder, "samples.npz"),
                 f", {np.mean(nfes):.0f} NFE per batch" if nfes else "")
    return run.folder
