"""Sample-quality evaluation: the FID Inception network, FID / KID / IS, stats files.

- `evaluation.inception`: the network (pytorch-fid's FID Inception in Flax), its
  preprocessing, the pure `apply(variables, images)` and `images_to_uint8`;
- `evaluation.pth`: torch-free, hardened reading of `.pth` files (any checkpoint);
- `evaluation.weights`: the Inception's weights, their cache and Flax mapping;
- `evaluation.metrics`: FID, KID, IS and the dataset statistics files.

Typical use::

    inception = get_inception_model(config.eval.inception_weights or None)
    feats = compute_activations(inception, batches_of_uint8_images, progress=True)
    ref = load_dataset_stats(config)
    fid = fid_from_activations(ref['pool_3'], feats['pool_3'])
    kid = kid_from_activations(ref['pool_3'], feats['pool_3'])
    inception_score = inception_score_from_logits(feats['logits'])
"""

from collections.abc import Callable
from typing import Any

import jax

from . import inception, metrics, pth, weights
from .inception import (
    INCEPTION_SIZE,
    NUM_LOGITS,
    POOL_DIM,
    FIDInceptionV3,
    bilinear_resize_matrix,
    compute_activations,
    get_inception_model_from_variables,
    images_to_uint8,
    preprocess_images,
    resize_bilinear_torch,
)
from .metrics import (
    activation_stats,
    dataset_stats_path,
    fid_from_activations,
    fid_from_stats,
    inception_score_from_logits,
    kid_and_std_from_activations,
    kid_from_activations,
    load_dataset_stats,
    save_stats,
)
from .pth import WeightFileError, load_torch_checkpoint, load_torch_state_dict
from .weights import (
    CACHE_ENV_VAR,
    FID_WEIGHTS_FILENAME,
    FID_WEIGHTS_URL,
    WEIGHTS_CONFIG_KEY,
    default_cache_dir,
    download_inception_weights,
    inception_variable_shapes,
    init_random_variables,
    load_inception_variables,
    torch_state_dict_keys,
    torch_state_dict_shapes,
    torch_state_dict_to_flax,
)


def get_inception_model(
    weights_path: str | None = None, variables: Any = None,
    precision: Any = jax.lax.Precision.HIGHEST,
) -> Callable[[Any], dict[str, jax.Array]]:
    """The FID Inception as a jitted function of uint8 image batches.

    (Here rather than in `inception`, which `weights` imports for the network layout.)

    Args:
      weights_path: a local pytorch-fid `pt_inception-2015-12-05-6726825d.pth`; None or
        '': the cache ($SCORE_SDE_CACHE or ~/.cache/score_sde), downloading on first use.
      variables: Flax variables to use instead of any file (e.g. `init_random_variables`).
      precision: matmul/conv precision; HIGHEST keeps GPU features equal to float32.

    Returns:
      `inception_fn(images)`: uint8 images [B, H, W, 3] or [B, H, W, 1] (numpy or jax,
      any B) -> {'pool_3': [B, 2048], 'logits': [B, 1008]} float32 jax arrays; see
      `inception.get_inception_model_from_variables`.
    """
    if variables is None:
        variables = weights.load_inception_variables(weights_path)
    return get_inception_model_from_variables(variables, precision=precision)


__all__ = [
    "CACHE_ENV_VAR", "FID_WEIGHTS_FILENAME", "FID_WEIGHTS_URL", "INCEPTION_SIZE",
    "NUM_LOGITS", "POOL_DIM", "WEIGHTS_CONFIG_KEY", "FIDInceptionV3", "WeightFileError",
    "activation_stats", "bilinear_resize_matrix", "compute_activations",
    "dataset_stats_path", "default_cache_dir", "download_inception_weights",
    "fid_from_activations", "fid_from_stats", "get_inception_model",
    "get_inception_model_from_variables", "images_to_uint8", "inception",
    "inception_score_from_logits", "inception_variable_shapes", "init_random_variables",
    "kid_and_std_from_activations", "kid_from_activations", "load_dataset_stats",
    "load_inception_variables", "load_torch_checkpoint", "load_torch_state_dict",
    "metrics", "preprocess_images", "pth", "resize_bilinear_torch", "save_stats",
    "torch_state_dict_keys", "torch_state_dict_shapes", "torch_state_dict_to_flax",
    "weights",
]
