"""The FID Inception's weights: pytorch-fid's `.pth` file, its cache, and its mapping
onto the Flax variables of `evaluation.inception.FIDInceptionV3`.

The weights are pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, read without
PyTorch by `evaluation.pth` (whose public names are re-exported here) and downloaded
into a cache on first use.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .inception import INCEPTION_SIZE, FIDInceptionV3
from .pth import WeightFileError, load_torch_checkpoint, load_torch_state_dict

__all__ = [  # the reader's public names are part of this module's interface too
    "CACHE_ENV_VAR", "FID_WEIGHTS_FILENAME", "FID_WEIGHTS_SHA256_PREFIX", "FID_WEIGHTS_URL",
    "WEIGHTS_CONFIG_KEY", "WeightFileError", "default_cache_dir", "download_inception_weights",
    "flax_layout", "inception_variable_shapes", "init_random_variables",
    "load_inception_variables", "load_torch_checkpoint", "load_torch_state_dict", "torch_key",
    "torch_layout", "torch_state_dict_keys", "torch_state_dict_shapes",
    "torch_state_dict_to_flax",
]

FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
FID_WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# pytorch-fid (like torch.hub) names its file after the first hex digits of its SHA-256.
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
WEIGHTS_CONFIG_KEY = "eval.inception_weights"
CACHE_ENV_VAR = "SCORE_SDE_CACHE"

# --------------------------------------------------------------------------------------
# FID Inception: Flax tree <-> pytorch-fid state dict
# --------------------------------------------------------------------------------------

# (collection, Flax leaf name) -> PyTorch parameter / buffer name.
_LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


@functools.cache
def inception_variable_shapes() -> Any:
    """Abstract variables ({'params', 'batch_stats'}) of `FIDInceptionV3`, no compute
    (cached; treat as read-only)."""
    x = jax.ShapeDtypeStruct((1, INCEPTION_SIZE, INCEPTION_SIZE, 3), jnp.float32)
    return jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0), x)


def torch_key(path: tuple[Any, ...]) -> str:
    """pytorch-fid state-dict name of a Flax variable path, e.g. ('params',
    'Mixed_5b', 'branch1x1', 'conv', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'."""
    names = [getattr(k, "key", k) for k in path]
    collection, modules, leaf = names[0], names[1:-1], names[-1]
    return ".".join([*modules, _LEAF_TO_TORCH[(collection, leaf)]])


def _torch_shape(flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(flax_shape)
    if len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    return shape[::-1] if len(shape) == 2 else shape


def torch_layout(x: Any) -> Any:
    """Flax layout -> PyTorch: conv HWIO -> OIHW, dense [in, out] -> [out, in]."""
    if x.ndim == 4:
        return x.transpose(3, 2, 0, 1)
    return x.T if x.ndim == 2 else x


def flax_layout(x: Any) -> Any:
    """PyTorch layout -> Flax, the inverse of `torch_layout`."""
    if x.ndim == 4:
        return x.transpose(2, 3, 1, 0)
    return x.T if x.ndim == 2 else x


def torch_state_dict_shapes() -> dict[str, tuple[int, ...]]:
    """pytorch-fid state-dict key -> PyTorch shape, for every tensor the network uses
    (BatchNorm `num_batches_tracked` counters are not used and not listed)."""
    return {torch_key(path): _torch_shape(leaf.shape)
            for path, leaf in jax.tree_util.tree_leaves_with_path(inception_variable_shapes())}


def torch_state_dict_keys() -> list[str]:
    """The state-dict keys `torch_state_dict_to_flax` requires, sorted."""
    return sorted(torch_state_dict_shapes())


def torch_state_dict_to_flax(sd: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """pytorch-fid state dict (numpy arrays, PyTorch layouts) -> Flax variables.

    Conv weights go OIHW -> HWIO, the fc weight [1008, 2048] -> [2048, 1008]; BatchNorm
    weight/bias/running_mean/running_var become params scale/bias and batch_stats
    mean/var. `*.num_batches_tracked` entries are ignored; any other missing or
    unexpected key, or a wrong shape, is an error naming it.
    """
    abstract = inception_variable_shapes()
    expected = {torch_key(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract)}
    present = {k for k in sd if not k.endswith(".num_batches_tracked")}
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing or unexpected:
        raise ValueError(
            "state dict does not match pytorch-fid's FID Inception: "
            f"{len(missing)} missing keys {missing[:5]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:5]}")

    def convert(path, leaf):
        key = torch_key(path)
        value = flax_layout(np.asarray(sd[key]))
        if value.shape != tuple(leaf.shape):
            raise ValueError(f"{key}: shape {np.shape(sd[key])} does not match the expected "
                             f"{_torch_shape(leaf.shape)}")
        return np.ascontiguousarray(value, dtype=np.float32)

    return jax.tree_util.tree_map_with_path(convert, abstract)


def init_random_variables(seed: int = 0) -> dict[str, Any]:
    """Random Flax variables (numpy float32) with the real layout, for tests and
    benchmarks.

    He-normal conv kernels and BatchNorm at identity statistics keep activations O(1)
    through the network, so outputs are finite and non-trivial. (numpy, not
    jax.random: eager jax would compile one kernel per distinct leaf shape.)
    """
    rng = np.random.default_rng(seed)

    def make(path, leaf):
        name = getattr(path[-1], "key", path[-1])
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return (rng.standard_normal(leaf.shape, np.float32)
                    * np.float32(np.sqrt(2.0 / fan_in)))
        fill = 1.0 if name in ("scale", "var") else 0.0
        return np.full(leaf.shape, fill, np.float32)

    return jax.tree_util.tree_map_with_path(make, inception_variable_shapes())


# --------------------------------------------------------------------------------------
# Weights file: cache and download
# --------------------------------------------------------------------------------------


def default_cache_dir() -> str:
    """$SCORE_SDE_CACHE, else ~/.cache/score_sde."""
    return os.environ.get(CACHE_ENV_VAR) or os.path.join(
        os.path.expanduser("~"), ".cache", "score_sde")


def download_inception_weights(cache_dir: str | None = None) -> str:
    """Path of pytorch-fid's weights in the cache, downloading them on first use.

    The download goes to a temporary file in the cache directory, must have a SHA-256
    starting with 6726825d, and is then renamed into place, so an interrupted or
    corrupt download never leaves a file that looks valid.
    """
    cache_dir = cache_dir or default_cache_dir()
    path = os.path.join(cache_dir, FID_WEIGHTS_FILENAME)
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, exist_ok=True)
    logging.getLogger(__name__).info("Downloading %s to %s", FID_WEIGHTS_URL, path)
    fd, tmp = tempfile.mkstemp(prefix=FID_WEIGHTS_FILENAME + ".", suffix=".part", dir=cache_dir)
    try:
        sha = hashlib.sha256()
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(FID_WEIGHTS_URL, timeout=60) as response:
                    while chunk := response.read(1 << 20):
                        sha.update(chunk)
                        f.write(chunk)
            except (urllib.error.URLError, OSError) as err:
                # The weights are missing and cannot be fetched: a missing input file.
                raise FileNotFoundError(
                    f"Could not download the FID Inception weights from {FID_WEIGHTS_URL} "
                    f"({err}). Download that file by hand and either place it at {path} "
                    f"or pass its path with --config.{WEIGHTS_CONFIG_KEY}=/path/to/"
                    f"{FID_WEIGHTS_FILENAME}.") from None
        digest = sha.hexdigest()
        if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
            raise RuntimeError(
                f"Downloaded {FID_WEIGHTS_URL} has SHA-256 {digest}, expected a digest "
                f"starting with {FID_WEIGHTS_SHA256_PREFIX}; not saved to {path}.")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load_inception_variables(weights_path: str | None = None) -> dict[str, Any]:
    """Flax variables of the FID Inception from a pytorch-fid `.pth` file (None or '':
    the cache, downloading on first use). Shapes are checked before data is read."""
    if not weights_path:
        weights_path = download_inception_weights()
    elif not os.path.exists(weights_path):
        raise FileNotFoundError(
            f"{WEIGHTS_CONFIG_KEY}={weights_path!r} does not exist; give the path of "
            f"{FID_WEIGHTS_FILENAME} ({FID_WEIGHTS_URL}) or leave it empty to use the cache "
            f"at {os.path.join(default_cache_dir(), FID_WEIGHTS_FILENAME)}.")
    sd = load_torch_state_dict(weights_path, expected_shapes=torch_state_dict_shapes())
    return torch_state_dict_to_flax(sd)
