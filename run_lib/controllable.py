"""--mode=inpaint, --mode=colorize and --mode=conditional (Song et al. 2021, Sec. 5, App. I).

All three are the PC sampler of config.sampling (predictor, corrector, snr, n_steps_each,
probability_flow, noise_removal) with the SDE's sampling eps, run by
`controllable_generation`, in resumable batches (see `run_lib.generate`). Inputs and masks come
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
import math
import os

import jax
import numpy as np
from absl import logging

import backend
import controllable_generation as cg
import datasets
from evaluation import images_to_uint8
from run_lib import files, inputs
from run_lib.checks import prepare
from run_lib.classifier import NORMALIZATIONS, load_classifier
from run_lib.devices import gather
from run_lib.generate import Run, padded, write_grid
from run_lib.steps import get_score_fn

# Rows of the comparison grid: enough to see, small enough to open.
COMPARISON_ROWS = 16


def _pc_args(config, sde):
    sc = config.sampling
    return dict(predictor=sc.predictor, corrector=sc.corrector, snr=sc.snr,
                n_steps=sc.n_steps_each, probability_flow=sc.probability_flow,
                denoise=sc.noise_removal, eps=sde.sampling_eps)


def _jit_on_mesh(run, fn):
    return jax.jit(backend.tuned(fn), out_shardings=run.sharding)


def _replace_program(run, make):
    """A jitted (rng, params, model_state, *inputs) -> images for a replacement sampler."""
    config, inverse_scaler = run.config, datasets.get_data_inverse_scaler(run.config)
    sampler = make(run.sde, inverse_scaler=inverse_scaler, **_pc_args(config, run.sde))

    def program(rng, params, model_state, *args):
        score_fn = get_score_fn(config, run.sde, run.model, params, model_state, any_time=False)
        return sampler(rng, score_fn, *args)

    return _jit_on_mesh(run, program)


def _per_input_batches(run, n_inputs, per_input, produce_batch, settings, desc):
    """Runs produce_batch(i, idx [b] of input indices, real) over the inputs, each repeated
    per_input times; returns its 'result' arrays in input-major order."""
    order = np.repeat(np.arange(n_inputs), per_input)
    b = run.batch_size

    def produce(i):
        idx, real = padded(order, i * b, b)
        return {"result": produce_batch(i, idx)[:real]}

    return run.run_batches(math.ceil(len(order) / b), produce, settings, desc,
                           grid_key="result")["result"]


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
    program = _replace_program(run, cg.get_pc_inpainter)
    scaler, per_input = datasets.get_data_scaler(config), int(c.samples_per_input)

    def produce_batch(i, idx):
        data = scaler(images[idx].astype(np.float32) / 255.0)
        out = program(run.batch_key(i), run.state.params_ema, run.state.model_state,
                      run.shard(data), run.shard(known[idx]))
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
    program = _replace_program(run, cg.get_pc_colorizer)
    scaler, per_input = datasets.get_data_scaler(config), int(c.samples_per_input)

    def produce_batch(i, idx):
        data = scaler(gray[idx].astype(np.float32) / 255.0)
        out = program(run.batch_key(i), run.state.params_ema, run.state.model_state,
                      run.shard(data))
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


def conditional(config, workdir: str, eval_folder: str = "eval") -> str:
    """sample.num_samples images of the classes config.controllable.labels names (in turn),
    guided by the noise-conditional classifier with scale controllable.scale (Eq. 14)."""
    del eval_folder
    config = prepare(config, "conditional", workdir)
    c = config.controllable
    wanted = inputs.parse_labels(c.labels, config.classifier.num_classes)
    n = int(config.sample.num_samples)
    labels = np.asarray([wanted[i % len(wanted)] for i in range(n)], np.int32)
    run = Run(config, workdir, "conditional")
    classifier, classifier_params, source = load_classifier(config, workdir, run.mesh)
    logging.info("Classifier: %s; guidance scale %g.", source, c.scale)
    program = _conditional_program(run, classifier)
    b = run.batch_size

    def produce(i):
        idx, real = padded(np.arange(n), i * b, b)
        out = program(run.batch_key(i), run.state.params_ema, run.state.model_state,
                      classifier_params, run.shard(labels[idx]))
        return {"samples": _to_uint8(run, out, f"conditional batch {i}")[:real],
                "labels": labels[idx][:real]}

    settings = run.settings(labels=c.labels, scale=float(c.scale), classifier=source,
                            classifier_config=config.classifier.to_dict())
    out = run.run_batches(math.ceil(n / b), produce, settings, "conditional batches",
                          grid_key="samples")
    if files.is_chief():
        files.atomic_savez(os.path.join(run.folder, "samples.npz"), samples=out["samples"],
                           labels=out["labels"])
        shown = out["samples"][:max(int(config.sample.grid_size), 1)]
        files.save_image_grid(shown, os.path.join(run.folder, "samples.png"))
        order = np.argsort(out["labels"], kind="stable")
        per_class = math.ceil(n / len(set(wanted)))
        files.save_image_grid(out["samples"][order], os.path.join(run.folder, "class_grid.png"),
                              cols=per_class)
    logging.info("Wrote %d class-conditional samples of classes %s to %s.", n,
                 sorted(set(wanted)), os.path.join(run.folder, "samples.npz"))
    return run.folder


def _conditional_program(run, classifier):
    config, sde = run.config, run.sde
    shape = (run.batch_size, config.data.image_size, config.data.image_size,
             config.data.num_channels)
    image_mean, image_std = NORMALIZATIONS[config.classifier.input_normalization]
    inverse_scaler = datasets.get_data_inverse_scaler(config)

    def program(rng, params, model_state, classifier_params, labels):
        score_fn = get_score_fn(config, sde, run.model, params, model_state, any_time=False)
        # Built here so that the classifier's parameters are traced, not baked in.
        sampler = cg.get_pc_conditional_sampler(
            sde, classifier, classifier_params, shape, inverse_scaler=inverse_scaler,
            scale=float(config.controllable.scale), image_mean=image_mean, image_std=image_std,
            **_pc_args(config, sde))
        return sampler(rng, score_fn, labels)

    return _jit_on_mesh(run, program)
