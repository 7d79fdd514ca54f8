"""FID, KID and Inception Score from Inception activations, and dataset stats files.

All metrics are float64 numpy on the host: a few thousand by 2048 activations, where
the accuracy of the matrix square root matters more than speed.

    ref = load_dataset_stats(config)
    fid = fid_from_activations(ref['pool_3'], feats['pool_3'])
    kid = kid_from_activations(ref['pool_3'], feats['pool_3'])
    inception_score = inception_score_from_logits(feats['logits'])
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import numpy as np
import scipy.linalg
import scipy.special

import data_files

# Stats paths relative to the repository root, whatever the working directory.
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# --------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------


def _as_2d_float64(a: Any, name: str) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be [N, D] activations, got shape {a.shape}")
    return a


def _psd_sqrt(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fid_from_stats(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any) -> float:
    """Frechet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2}), float64.

    Tr((S1 S2)^{1/2}) is computed as the nuclear norm of S1^{1/2} S2^{1/2} (its
    singular values are the square roots of the eigenvalues of S1^{1/2} S2 S1^{1/2},
    which is similar to S1 S2). Unlike `scipy.linalg.sqrtm(S1 @ S2)` this stays real
    and accurate for the rank-deficient covariances of N < D samples.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"inconsistent FID statistics shapes {mu1.shape}, {s1.shape}, "
                         f"{mu2.shape}, {s2.shape}")
    tr_covmean = scipy.linalg.svdvals(_psd_sqrt(s1) @ _psd_sqrt(s2)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def activation_stats(a: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] (float64) of activations [N, D]."""
    a = _as_2d_float64(a, "activations")
    if a.shape[0] < 2:
        raise ValueError(f"need at least 2 activations for a covariance, got {a.shape[0]}")
    return a.mean(axis=0), np.cov(a, rowvar=False)


def fid_from_activations(a: Any, b: Any) -> float:
    """FID between activation sets a [N, D] and b [M, D] (e.g. pool_3, D = 2048)."""
    return fid_from_stats(*activation_stats(a), *activation_stats(b))


def kid_and_std_from_activations(a: Any, b: Any,
                                 max_block_size: int = 1024) -> tuple[float, float]:
    """KID and its standard error, TF-GAN's block estimator.

    The sets are split into n_blocks = ceil(max(N, M) / max_block_size) consecutive
    blocks of near-equal size (the last N mod n_blocks blocks one larger); each block
    gives the unbiased MMD^2 with kernel k(x, y) = (x.y / D + 1)^3; KID is their mean and
    the error is their std / sqrt(n_blocks) (nan for a single block).
    """
    a, b = _as_2d_float64(a, "a"), _as_2d_float64(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"activation widths differ: {a.shape[1]} vs {b.shape[1]}")
    n_a, n_b = a.shape[0], b.shape[0]
    n_blocks = int(np.ceil(max(n_a, n_b) / max_block_size))

    def bounds(n: int) -> np.ndarray:
        v, n_plus = n // n_blocks, n % n_blocks
        sizes = [v] * (n_blocks - n_plus) + [v + 1] * n_plus
        if min(sizes) < 2:
            raise ValueError(f"KID needs at least 2 activations per block; {n} activations "
                             f"in {n_blocks} blocks")
        return np.concatenate([[0], np.cumsum(sizes)])

    ia, ib = bounds(n_a), bounds(n_b)
    dim = a.shape[1]
    estimates = []
    for i in range(n_blocks):
        x, y = a[ia[i]:ia[i + 1]], b[ib[i]:ib[i + 1]]
        m, n = len(x), len(y)
        k_xx = (x @ x.T / dim + 1) ** 3
        k_yy = (y @ y.T / dim + 1) ** 3
        k_xy = (x @ y.T / dim + 1) ** 3
        estimates.append((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
                         + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
                         - 2 * k_xy.mean())
    estimates = np.asarray(estimates)
    mean = estimates.mean()
    std = (np.sqrt(((estimates - mean) ** 2).sum() / (n_blocks - 1) / n_blocks)
           if n_blocks > 1 else float("nan"))
    return float(mean), float(std)


def kid_from_activations(a: Any, b: Any, max_block_size: int = 1024) -> float:
    """Kernel Inception Distance (TF-GAN's block estimator), see
    `kid_and_std_from_activations`."""
    return kid_and_std_from_activations(a, b, max_block_size)[0]


def inception_score_from_logits(logits: Any) -> float:
    """IS = exp(mean_x KL(p(y|x) || p(y))), p(y|x) = softmax(logits [N, 1008]), p(y) its
    mean over the set (TF-GAN's classifier_score_from_logits: one split)."""
    logits = _as_2d_float64(logits, "logits")
    log_p = scipy.special.log_softmax(logits, axis=1)
    p = np.exp(log_p)
    p_y = p.mean(axis=0)
    # A class no image uses has p(y) = 0 and p(y|x) = 0: its KL terms are 0, not nan.
    log_py = np.log(np.where(p_y > 0, p_y, 1.0))
    kl = (p * (log_p - log_py)).sum(axis=1)
    return float(np.exp(kl.mean()))


# --------------------------------------------------------------------------------------
# Stats files
# --------------------------------------------------------------------------------------


def _size_free(dataset: str) -> int | None:
    """The image size at which the dataset's statistics file carries no size in its name: the
    stored size of a square data set (data_files.NATIVE_SIZES); for CelebA (218 x 178, cropped
    square) the 64 px of the reference's configs and its celeba_stats.npz."""
    if dataset == "CELEBA":
        return 64
    h, w = data_files.NATIVE_SIZES.get(dataset, (None, None))
    return h if h == w else None


def dataset_stats_path(config: Any) -> str:
    """Where `--mode=fid_stats` writes, and evaluation reads, the dataset's statistics.

    `<config.eval.stats_dir>/<dataset>[_<category>][_<image_size>]_stats.npz`, with the
    dataset name lower-cased, the LSUN category included, and the image size included
    unless it is the dataset's native one (cifar10_stats.npz, lsun_church_outdoor_256_...).
    A relative stats_dir is taken from the project root. 'folder' data sets are told apart by
    their folder (`folder_<name>_<hash of its absolute path and channels>`); characters other
    than letters, digits, '.', '-' and '_' ('tfds:lsun/tower') become '_'.
    """
    stats_dir = config.eval.get("stats_dir", "") or os.path.join("assets", "stats")
    if not os.path.isabs(stats_dir):
        stats_dir = os.path.join(_PROJECT_ROOT, stats_dir)
    name = re.sub(r"[^a-z0-9_.-]+", "_", config.data.dataset.lower())
    if config.data.dataset == "folder":  # one name per folder, not one for all folders
        where = os.path.abspath(str(config.data.data_dir))
        digest = hashlib.sha1(f"{where}|{config.data.num_channels}".encode()).hexdigest()[:8]
        base = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(where.rstrip(os.sep)))
        name += f"_{base}_{digest}"
    if config.data.dataset == "LSUN":
        name += f"_{config.data.category}"
    if _size_free(config.data.dataset) != config.data.image_size:
        name += f"_{config.data.image_size}"
    return os.path.join(stats_dir, f"{name}_stats.npz")


def save_stats(path: str | os.PathLike, pool_3: Any, logits: Any = None) -> None:
    """Write a stats `.npz` with 'pool_3' [N, 2048] (and 'logits' [N, 1008] if given),
    atomically."""
    path = os.fspath(path)
    arrays = {"pool_3": np.asarray(pool_3, np.float32)}
    if logits is not None:
        arrays["logits"] = np.asarray(logits, np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_dataset_stats(config: Any) -> dict[str, np.ndarray]:
    """Reference activations of the dataset: {'pool_3': [N, 2048], ('logits')}."""
    path = dataset_stats_path(config)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No dataset statistics at {path}. Compute them with "
            "`python main.py --mode=fid_stats --config=<your config> --workdir=<dir>` (or "
            "set config.eval.stats_dir).")
    # Each array's header is checked before it is read (a small file can declare GBs).
    data = data_files.read_npz(path)
    if "pool_3" not in data:
        raise ValueError(f"{path} has no 'pool_3' array (keys: {sorted(data)})")
    return data
