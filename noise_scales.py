"""NCSNv2's noise-scale techniques (Song & Ermon 2020, "Improved Techniques for Training
Score-Based Generative Models", Sec. 3-4) as plain functions: the largest distance between two
training images (Technique 1's sigma_max), the geometric ratio and number of scales with the
target overlap (Technique 2) and the Langevin step size of Eq. 4 (Technique 4).
`--mode=data_stats` (run_lib/data_statistics.py) applies them to a data set.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

OVERLAP = 0.5  # Technique 2's target overlap of consecutive noise scales
TOP_K = 8  # candidate pairs per block pair, rechecked in exact integer arithmetic


@jax.jit
def _block_candidates(a, b, mean):
    """Top-K approximate squared distances between rows of a [n, D] and b [m, D] (uint8)."""
    # Centering first keeps the Gram trick's cancellation small; the winners are recomputed
    # exactly on the host.
    a = a.astype(jnp.float32) - mean
    b = b.astype(jnp.float32) - mean
    d2 = (jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :]
          - 2.0 * jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST))
    values, flat = jax.lax.top_k(d2.reshape(-1), min(TOP_K, d2.size))
    return values, flat // d2.shape[1], flat % d2.shape[1]


def max_pairwise_distance(images: np.ndarray, block: int | None = None):
    """(largest distance, (i, j)) between two of images [N, ...] (uint8), in 8-bit units.

    Blockwise on the device: each pair of row blocks proposes its TOP_K largest squared
    distances (float32 Gram matrix of centered data), and the proposals are recomputed exactly
    in int64 on the host.
    """
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    n, dim = flat.shape
    if n < 2:
        return 0.0, (0, 0)
    if block is None:  # about 64 MB per float32 block
        block = int(np.clip(2 ** int(np.log2(max(16e6 / dim, 1))), 16, 1024))
    block = min(block, n)
    mean = jnp.asarray(flat.mean(axis=0, dtype=np.float64), jnp.float32)
    # Pad by repeating rows: repeated images add no new distances, and one shape compiles once.
    padded = np.concatenate([flat, np.repeat(flat[-1:], (-n) % block, axis=0)])
    starts = range(0, len(padded), block)
    best, pair = -1, (0, 0)
    for s in starts:
        a = jnp.asarray(padded[s:s + block])
        for t in starts:
            if t < s:
                continue
            _, rows, cols = jax.device_get(_block_candidates(a, jnp.asarray(padded[t:t + block]),
                                                             mean))
            for i, j in zip(rows + s, cols + t, strict=True):
                i, j = min(int(i), n - 1), min(int(j), n - 1)
                d2 = int(np.sum((flat[i].astype(np.int64) - flat[j]) ** 2))
                if d2 > best:
                    best, pair = d2, (i, j)
    return math.sqrt(best), pair


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def scale_overlap(gamma: float, dim: int) -> float:
    """Technique 2's Phi(sqrt(2D)(gamma - 1) + 3 gamma) - Phi(sqrt(2D)(gamma - 1) - 3 gamma)."""
    c = math.sqrt(2.0 * dim) * (gamma - 1.0)
    return _phi(c + 3.0 * gamma) - _phi(c - 3.0 * gamma)


def noise_scale_ratio(dim: int, overlap: float = OVERLAP) -> float:
    """The gamma > 1 at which scale_overlap(gamma, dim) = overlap (bisection; it decreases)."""
    lo, hi = 1.0, 2.0
    while scale_overlap(hi, dim) > overlap:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if scale_overlap(mid, dim) > overlap else (lo, mid)
    return 0.5 * (lo + hi)


def num_noise_scales(sigma_max: float, sigma_min: float, dim: int,
                     overlap: float = OVERLAP) -> int:
    """Technique 2's number of scales L: the fewest with ratio <= gamma."""
    gamma = noise_scale_ratio(dim, overlap)
    return max(2, math.ceil(math.log(sigma_max / sigma_min) / math.log(gamma) - 1e-9) + 1)


def langevin_variance_ratio(a: float, gamma: float, steps: int) -> float:
    """NCSNv2 Eq. 4 with eps = a sigma_L^2: (1 - a)^{2T} (gamma^2 - 2/(2 - a)) + 2/(2 - a)."""
    c = 2.0 / (2.0 - a)
    return (1.0 - a) ** (2 * steps) * (gamma ** 2 - c) + c


def langevin_step(gamma: float, steps: int) -> float:
    """a = eps / sigma_L^2 in (0, 1) that brings Eq. 4 closest to 1 (grid, then refined)."""
    grid = np.linspace(1e-6, 1.0 - 1e-6, 20001)
    cost = np.abs([langevin_variance_ratio(a, gamma, steps) - 1.0 for a in grid])
    k = int(np.argmin(cost))
    fine = np.linspace(grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)], 2001)
    return float(fine[np.argmin([abs(langevin_variance_ratio(a, gamma, steps) - 1.0)
                                 for a in fine])])
