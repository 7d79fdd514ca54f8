"""--mode=conditional: class-conditional sampling guided by the noise-conditional classifier
that --mode=train_classifier trains (Song et al. 2021, Sec. 5, Eq. 14, App. I.1), with the
sampler of config.sampling (the PC sampler for method 'pc', as in the paper; any other sampler
on the conditional score), in resumable batches (`run_lib.batches`).

Files, in <out> (config.sample.out; '' = <workdir>/conditional/ckpt_<k>): samples.npz
('samples' uint8, 'labels'), samples.png, class_grid.png (a row per class).
"""

from __future__ import annotations

import math
import os

import numpy as np
from absl import logging

import controllable_generation as cg
from evaluation import images_to_uint8
from run_lib import files, inputs
from run_lib.batches import Run, padded
from run_lib.build import get_sample_fn, get_score_fn
from run_lib.checks import prepare
from run_lib.classifier import NORMALIZATIONS, load_classifier
from run_lib.devices import gather


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
    b, sizes = run.batch_size, run.sizes(n)

    def produce(i):
        idx, real = padded(np.arange(n), i * b, run.computed_size(sizes[i]))
        out = program(run.batch_key(i), len(idx),
                      (run.state.params_ema, run.state.model_state, classifier_params,
                       run.shard(labels[idx])))
        images = files.checked_images(gather(out), f"conditional batch {i}")
        return {"samples": images_to_uint8(images)[:real], "labels": labels[idx][:real]}

    settings = run.settings(labels=c.labels, scale=float(c.scale), classifier=source,
                            classifier_config=config.classifier.to_dict())
    out = run.run_batches(len(sizes), produce, settings, "conditional batches",
                          grid_key="samples", sizes=sizes)
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
    """program(rng, batch, (params, model_state, classifier_params, labels)) -> images: the
    sampler of config.sampling on the conditional score (Eq. 14): the PC sampler in parts for
    method 'pc', else that sampler in one program (the few-step samplers take any score
    function). The classifier's parameters are traced, not baked in."""
    config, sde = run.config, run.sde
    shape = (config.data.image_size, config.data.image_size, config.data.num_channels)
    image_mean, image_std = NORMALIZATIONS[config.classifier.input_normalization]

    def score_of(params, model_state, classifier_params, labels, any_time):
        score_fn = get_score_fn(config, sde, run.model, params, model_state, any_time=any_time)
        return cg.get_conditional_score_fn(sde, score_fn, classifier, classifier_params, labels,
                                           float(config.controllable.scale), image_mean,
                                           image_std)

    programs = {}

    def program(rng, batch, score_args):
        if batch not in programs:
            programs[batch] = get_sample_fn(
                config, sde, run.model, (batch, *shape), run.mesh, score_of=score_of,
                what=f"the classifier-guided {config.sampling.method} sampler (batch {batch})")
        return programs[batch](rng, *score_args)[0]

    return program
