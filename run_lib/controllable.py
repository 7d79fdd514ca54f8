"""--mode=inpaint and --mode=colorize (Song et al. 2021, Sec. 5, App. I.2, I.3); --mode=conditional
is `run_lib.guided` (its name stays importable here).

All three are the PC sampler of config.sampling (predictor, corrector, snr, n_steps_each,
probability_flow, noise_removal) with the SDE's sampling eps, run by
`controllable_generation`, in resumable batches (see `run_lib.batches`). Inputs and masks come
from config.controllable (`run_lib.inputs`); conditional sampling loads the noise-conditional
classifier that --mode=train_classifier trains (`run_lib.classifier`).

Files, in <out> (config.sample.out; '' = <workdir>/<mode>/ckpt_<k>):
  inpaint:     input, masked, result (.npz 'samples' uint8 + .png grid), mask.npz ('mask', 1 =
               known), comparison.png (a row per input: input, masked, its samples), index.json
  colorize:    input, gray, result (.npz + .png), comparison.png, index.json
  conditional: samples.npz ('samples', 'labels'), samples.png, class_grid.png (a row per class)
result[i * S + j] is sample j of input i (S = controllable.samples_per_input).
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import logging

import controllable_generation as cg
import datasets
from evaluation import images_to_uint8
from run_lib import files, inputs
from run_lib.batches import Run, padded, write_grid
from run_lib.build import pc_program
from run_lib.checks import prepare
from run_lib.devices import gather
from run_lib.guided import conditional

__all__ = ["colorize", "conditional", "inpaint"]

# Rows of the comparison grid: enough to see, small enough to open.
COMPARISON_ROWS = 16


def _replace_program(run, make_parts, what):
    """A LoopProgram (rng, batch, (params, model_state), inputs) -> images of a replacement
    sampler's parts `make_parts(sde, shape, ...)` with the PC settings of config.sampling."""
    config = run.config
    shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    return pc_program(config, run.sde, run.model, run.mesh, shape, what, make_parts)


def _per_input_batches(run, n_inputs, per_input, produce_batch, settings, desc):
    """Runs produce_batch(i, idx [b] of input indices) over the inputs, each repeated
    per_input times (the last batch only as large as needed); returns its 'result' arrays in
    input-major order."""
    order = np.repeat(np.arange(n_inputs), per_input)
    b, sizes = run.batch_size, run.sizes(len(order))

    def produce(i):
        idx, real = padded(order, i * b, run.computed_size(sizes[i]))
        return {"result": produce_batch(i, idx)[:real]}

    return run.run_batches(len(sizes), produce, settings, desc, grid_key="result",
                           sizes=sizes)["result"]


def _to_uint8(run, images, what):
    return images_to_uint8(files.checked_images(gather(images), what))


def _write_comparison(folder, columns, per_input, config):
    """comparison.png: a row per input (the first COMPARISON_ROWS): the given columns, then
    that input's samples."""
    *fixed, result = columns
    rows = min(len(fixed[0]), COMPARISON_ROWS)
    cells = []
    for i in range(rows):
        cells += [column[i] for column in fixed] + list(result[i * per_input:(i + 1) * per_input])
    files.save_image_grid(np.stack(cells), os.path.join(folder, "comparison.png"),
                          cols=len(fixed) + per_input)


def _write_index(folder, names, run, **extra):
    files.atomic_write_text(os.path.join(folder, "index.json"), json.dumps(
        {"names": list(names), "ckpt": run.ckpt, "step": int(run.state.step),
         "samples_per_input": int(run.config.controllable.samples_per_input), **extra},
        indent=1))


def inpaint(config, workdir: str, eval_folder: str = "eval") -> str:
    """Fills in the masked pixels of config.controllable's inputs (App. I.2); returns <out>."""
    del eval_folder
    config = prepare(config, "inpaint", workdir)
    c = config.controllable
    images, names = inputs.read_images(config)
    known = inputs.masks(config, len(images), np.random.default_rng(config.seed))
    run = Run(config, workdir, "inpaint")
    program = _replace_program(run, cg.get_pc_inpainter_parts, "the PC inpainter")
    scaler, per_input = datasets.get_data_scaler(config), int(c.samples_per_input)

    def produce_batch(i, idx):
        data = scaler(images[idx].astype(np.float32) / 255.0)
        out = program(run.batch_key(i), len(idx), (run.state.params_ema, run.state.model_state),
                      (run.shard(data), run.shard(known[idx])))
        return _to_uint8(run, out, f"inpainting batch {i}")

    settings = run.settings(controllable=c.to_dict(), num_inputs=len(images))
    result = _per_input_batches(run, len(images), per_input, produce_batch, settings,
                                "inpainting batches")
    if files.is_chief():
        # Pixels to fill in are shown mid-grey.
        masked = np.where(known > 0, images, np.uint8(128)).astype(np.uint8)
        for name, array in (("input", images), ("masked", masked), ("result", result)):
            write_grid(run.folder, name, array, config)
        files.atomic_savez(os.path.join(run.folder, "mask.npz"), mask=known.astype(np.uint8))
        _write_comparison(run.folder, (images, masked, result), per_input, config)
        _write_index(run.folder, names, run, mask=c.mask)
    logging.info("Inpainted %d inputs x %d samples: %s", len(images), per_input,
                 os.path.join(run.folder, "comparison.png"))
    return run.folder


def colorize(config, workdir: str, eval_folder: str = "eval") -> str:
    """Colours grey versions of config.controllable's inputs (App. I.3); returns <out>."""
    del eval_folder
    config = prepare(config, "colorize", workdir)
    c = config.controllable
    images, names = inputs.read_images(config, num_channels=3)
    # The grey image the colorizer keeps: the mean of the channels (its gray direction).
    gray = np.repeat(np.round(images.astype(np.float32).mean(-1, keepdims=True)), 3,
                     axis=-1).astype(np.uint8)
    run = Run(config, workdir, "colorize")
    program = _replace_program(run, cg.get_pc_colorizer_parts, "the PC colorizer")
    scaler, per_input = datasets.get_data_scaler(config), int(c.samples_per_input)

    def produce_batch(i, idx):
        data = scaler(gray[idx].astype(np.float32) / 255.0)
        out = program(run.batch_key(i), len(idx), (run.state.params_ema, run.state.model_state),
                      (run.shard(data),))
        return _to_uint8(run, out, f"colorization batch {i}")

    settings = run.settings(controllable=c.to_dict(), num_inputs=len(images))
    result = _per_input_batches(run, len(images), per_input, produce_batch, settings,
                                "colorization batches")
    if files.is_chief():
        for name, array in (("input", images), ("gray", gray), ("result", result)):
            write_grid(run.folder, name, array, config)
        _write_comparison(run.folder, (images, gray, result), per_input, config)
        _write_index(run.folder, names, run)
    logging.info("Colorized %d inputs x %d samples: %s", len(images), per_input,
                 os.path.join(run.folder, "comparison.png"))
    return run.folder
