"""The noise-conditional classifier of controllable generation (App. I.1): its module from a
config, its initial parameters, and its checkpoints (this project's classifier folders and
the reference's flax msgpack files).
"""

from __future__ import annotations

import json
import os
import re

import flax
import jax
import jax.numpy as jnp

from models.param_trees import first_difference, leaf_shapes
from models.wideresnet_noise_conditional import WideResnet


def _wide_resnet(blocks_per_group, channel_multiplier, num_outputs):
    return WideResnet(blocks_per_group=int(blocks_per_group),
                      channel_multiplier=int(channel_multiplier), num_outputs=int(num_outputs))


def create_classifier_module(config):
    """The noise-conditional WideResnet of `config.classifier` (App. I.1).

    Applied as `classifier.apply({'params': p}, x [B, H, W, C], noise_scale [B], train=False)`
    -> logits [B, num_classes], noise_scale = std(t) of the SDE's perturbation kernel. Its
    parameter tree has no prefix, as the reference's classifier checkpoint.
    """
    c = config.classifier
    return _wide_resnet(c.blocks_per_group, c.channel_multiplier, c.num_classes)


def init_classifier_params(classifier, rng, image_shape):
    """Initial parameters of a classifier for images [H, W, C] (jitted, as `init_model`)."""
    x = jnp.ones((1, *image_shape), jnp.float32)
    init = jax.jit(lambda rng: classifier.init({"params": rng, "dropout": jax.random.PRNGKey(0)},
                                               x, jnp.ones((1,), jnp.float32), train=False))
    return flax.core.unfreeze(init(rng))["params"]


def _newest_classifier_step(folder: str) -> str | None:
    """The newest checkpoint_<k> of a classifier folder (`<folder>/checkpoints/`) or None."""
    for parent in (os.path.join(folder, "checkpoints"), folder):
        if not os.path.isdir(parent):
            continue
        steps = [int(m.group(1)) for m in (re.fullmatch(r"checkpoint_(\d+)", n)
                                           for n in os.listdir(parent)) if m]
        if steps:
            return os.path.join(parent, f"checkpoint_{max(steps)}")
    return None


def load_classifier_params(path: str, init_params):
    """Classifier parameters from `path`, checked against the shapes of `init_params`.

    `path`: a classifier folder written by `--mode=train_classifier` (`<workdir>/classifier`,
    its newest checkpoint), one of its `checkpoint_<k>` folders, or a flax msgpack file of the
    parameters (what the reference's `checkpoints.restore_checkpoint` reads). Raises
    FileNotFoundError, or ValueError naming the first parameter whose shape differs.
    """
    if os.path.isfile(path):
        with open(path, "rb") as f:
            try:
                raw = flax.serialization.msgpack_restore(f.read())
            except Exception as e:  # noqa: BLE001 (msgpack raises many types on bad bytes)
                raise ValueError(f"{path}: not a flax msgpack checkpoint ({e}).") from None
        raw = raw.get("params", raw) if isinstance(raw, dict) else raw
    else:
        folder = path if os.path.isdir(os.path.join(path, "default")) else \
            _newest_classifier_step(path)
        if folder is None:
            raise FileNotFoundError(f"{path}: no classifier checkpoint (checkpoint_<k>) there.")
        # Orbax takes over a second to import; only this branch needs it.
        import orbax.checkpoint as ocp

        raw = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(folder),
                                                              "default"))["params"]
    problem = first_difference(leaf_shapes(raw), leaf_shapes(init_params))
    if problem is not None:
        raise ValueError(
            f"{path} does not match the classifier's config: {problem} "
            "(config.classifier.blocks_per_group, channel_multiplier, num_classes and the "
            "image size).")
    return jax.tree_util.tree_map(jnp.asarray, flax.serialization.from_state_dict(init_params,
                                                                                  raw))


def create_classifier(prng_key, batch_size, ckpt_path, blocks_per_group: int = 4,
                      channel_multiplier: int = 10, num_outputs: int = 10,
                      image_shape=(32, 32, 3)):
    """The reference's helper (yang-song/score_sde models/utils.create_classifier): a
    noise-conditional WideResnet and its parameters restored from `ckpt_path`.

    By default WRN-28-10 for 32 x 32 x 3 images, as the reference; `ckpt_path` may be the
    reference's flax msgpack file or a classifier folder of this project (see
    `load_classifier_params`), whose `config.json` then gives the sizes.
    Returns (classifier, classifier_params). `batch_size` is kept for compatibility.
    """
    del batch_size  # shapes do not depend on it
    saved = os.path.join(ckpt_path, "config.json")
    if os.path.isdir(ckpt_path) and os.path.isfile(saved):
        with open(saved) as f:
            config = json.load(f)
        c, data = config["classifier"], config["data"]
        blocks_per_group, channel_multiplier = c["blocks_per_group"], c["channel_multiplier"]
        num_outputs = c["num_classes"]
        image_shape = (data["image_size"], data["image_size"], data["num_channels"])
    classifier = _wide_resnet(blocks_per_group, channel_multiplier, num_outputs)
    init_params = init_classifier_params(classifier, prng_key, tuple(image_shape))
    return classifier, load_classifier_params(ckpt_path, init_params)
