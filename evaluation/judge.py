"""An independent Fashion-MNIST judge: a small CNN classifier trained once on clean images.

Inception features mean little on 28 x 28 grey clothes, and Inception weights cannot be
downloaded here, so sample quality on Fashion-MNIST is also measured with this judge:
- `judge_fid`: the Frechet distance between the judge's penultimate features (128) of samples
  and of the test set (the FID formula on other features; lower is better; 0 for identical
  distributions);
- `classify`: its predicted class, e.g. to check that class-conditional samples show the
  requested class, or that inpainting keeps the class of the original.

It is trained by `benchmarks/train_judge.py` on the clean training split only (no diffusion
noise, nothing shared with the score models or the guidance classifier) and stored with float16
weights in `assets/judge/fashion_mnist_judge.npz` (with its test accuracy).
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from evaluation import metrics

JUDGE_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "assets", "judge", "fashion_mnist_judge.npz")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")
SIZE = 28


class FashionJudge(nn.Module):
    """CNN on [B, 28, 28, 1] images in [0, 1]: (logits [B, 10], features [B, 128])."""

    @nn.compact
    def __call__(self, x):
        h = x * 2.0 - 1.0
        for width in (32, 64):
            h = nn.relu(nn.Conv(width, (3, 3))(h))
            h = nn.relu(nn.Conv(width, (3, 3))(h))
            h = nn.max_pool(h, (2, 2), (2, 2))
        h = nn.relu(nn.Conv(128, (3, 3))(h))
        features = jnp.mean(h, axis=(1, 2))
        return nn.Dense(len(CLASSES))(features), features


def prepare(images) -> jax.Array:
    """uint8 (or [0, 1] float) [B, H, W, 1] -> float [B, 28, 28, 1]; 32 px is center-cropped."""
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[1:3] == (32, 32):  # the zero-padded 32 px variant of the data set
        images = images[:, 2:30, 2:30]
    if images.shape[1:] != (SIZE, SIZE, 1):
        raise ValueError(f"The Fashion-MNIST judge takes [B, 28, 28, 1] (or 32 px padded) "
                         f"images, got {images.shape}.")
    return jnp.asarray(images, jnp.float32)


def load(path: str = JUDGE_PATH) -> dict:
    """The judge's parameters (float32) from its .npz file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"No judge weights at {path}; train them with "
                                "`python benchmarks/train_judge.py`.")
    with np.load(path) as f:
        flat = {k: np.asarray(f[k], np.float32) for k in f.files if k.startswith("params/")}
    params: dict = {}
    for key, value in flat.items():
        node = params
        *parents, leaf = key.split("/")[1:]
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return params


def save(params, path: str, **metadata) -> None:
    """Writes float16 parameters (and scalar metadata such as the test accuracy)."""
    flat = {"params/" + "/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v, np.float16)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez_compressed(path, **flat, **{k: np.asarray(v) for k, v in metadata.items()})


@jax.jit
def _apply(params, x):
    return FashionJudge().apply({"params": params}, x)


def logits_and_features(params, images, batch_size: int = 500):
    """(logits [N, 10], features [N, 128]) as numpy, in batches."""
    x = prepare(images)
    outs = [_apply(params, x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    return (np.concatenate([np.asarray(o[0]) for o in outs]),
            np.concatenate([np.asarray(o[1]) for o in outs]))


def classify(params, images) -> np.ndarray:
    """Predicted classes [N] of images."""
    return np.argmax(logits_and_features(params, images)[0], axis=-1)


def judge_fid(params, images, reference_images) -> float:
    """Frechet distance between the judge's features of `images` and of `reference_images`."""
    return metrics.fid_from_activations(logits_and_features(params, reference_images)[1],
                                        logits_and_features(params, images)[1])
