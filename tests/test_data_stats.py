"""--mode=data_stats (run_lib.data_statistics): NCSNv2's Techniques 1, 2 and 4 (Song & Ermon
2020) against brute force, the formulas evaluated directly, and the NCSNv2 CIFAR-10 settings."""

import json
import math
import os

import numpy as np
import pytest
from run_helpers import main_args, read_idx, run
from scipy.stats import norm

from configs import tiny_test
from run_lib import data_statistics as ds


def brute_force_max(images):
    flat = images.reshape(len(images), -1).astype(np.int64)
    d2 = ((flat[:, None] - flat[None]) ** 2).sum(-1)
    return math.sqrt(d2.max()), d2


@pytest.mark.parametrize("n,block", [(301, 64), (7, None), (2, 1)])
def test_max_pairwise_distance_is_brute_force(n, block):
    rng = np.random.default_rng(n)
    images = rng.integers(0, 256, (n, 6, 5, 3), dtype=np.uint8)
    got, (i, j) = ds.max_pairwise_distance(images, block=block)
    want, d2 = brute_force_max(images)
    assert got == want
    assert d2[i, j] == d2.max()


def test_max_pairwise_distance_of_nearly_equal_bright_images():
    # Large norms, tiny differences: the Gram trick's cancellation case. The answer is exact.
    images = np.full((40, 16, 16, 3), 250, np.uint8)
    rng = np.random.default_rng(0)
    for k in range(40):
        images[k].flat[rng.integers(0, images[k].size, 3)] = rng.integers(240, 256, 3)
    got, _ = ds.max_pairwise_distance(images, block=16)
    assert got == brute_force_max(images)[0]


@pytest.mark.parametrize("dim", [784, 3072, 256 * 256 * 3])
def test_noise_scales_follow_technique_2(dim):
    phi = norm.cdf
    gamma = ds.noise_scale_ratio(dim)
    c = math.sqrt(2 * dim) * (gamma - 1)
    assert phi(c + 3 * gamma) - phi(c - 3 * gamma) == pytest.approx(0.5, abs=1e-9)
    sigma_max, sigma_min = 50.0, 0.01
    n = ds.num_noise_scales(sigma_max, sigma_min, dim)

    def overlap(scales):
        g = (sigma_max / sigma_min) ** (1 / (scales - 1))
        c = math.sqrt(2 * dim) * (g - 1)
        return phi(c + 3 * g) - phi(c - 3 * g)

    # The fewest scales whose consecutive ratio keeps the overlap at 1/2 or more.
    assert overlap(n) >= 0.5 > overlap(n - 1)


# NCSNv2's published settings (its configs; configs/presets.py here): data dimension, sigma_1, L,
# steps per scale T, and the snr of its step size eps (snr = sqrt(eps / (2 sigma_L^2))).
NCSNV2 = {"cifar10": (32 * 32 * 3, 50.0, 232, 5, 0.176),
          "celeba": (64 * 64 * 3, 90.0, 500, 5, 0.128),
          "bedroom": (128 * 128 * 3, 190.0, 1086, 3, 0.095)}


@pytest.mark.parametrize("name", sorted(NCSNV2))
def test_langevin_step_reproduces_ncsnv2(name):
    dim, sigma_1, scales, steps, snr = NCSNV2[name]
    gamma = (sigma_1 / 0.01) ** (1 / (scales - 1))
    a = ds.langevin_step(gamma, steps)
    assert math.sqrt(a / 2) == pytest.approx(snr, abs=1.5e-3)
    if name == "cifar10":  # NCSNv2's step_lr 6.2e-6
        assert a * 0.01 ** 2 == pytest.approx(6.2e-6, rel=0.01)
    # Eq. 4 evaluated directly is smallest there (it stays above 1 for gamma > 1).
    grid = np.linspace(0.001, 0.999, 999)
    c = 2 * grid / (1 - (1 - grid) ** 2)
    values = (1 - grid) ** (2 * steps) * (gamma ** 2 - c) + c
    assert values.min() >= ds.langevin_variance_ratio(a, gamma, steps) - 1e-12 > 1.0
    # NCSNv2's L is a little larger than the overlap-1/2 count (its scales overlap ~0.57).
    assert ds.num_noise_scales(sigma_1, 0.01, dim) < scales < 1.1 * ds.num_noise_scales(
        sigma_1, 0.01, dim)


def test_data_stats_through_main(tmp_path, data_dir):
    train = read_idx(os.path.join(data_dir, "train-images-idx3-ubyte.gz"))  # 64 images
    workdir = tmp_path / "stats"
    proc = run(main_args("data_stats", str(workdir), data_dir,
                         "--config.data_stats.max_images=40"))
    stats = json.loads((workdir / "data_stats.json").read_text())
    config = tiny_test.get_config()
    # Model input space: [0, 1] for the VE tiny config (x2 when data are centered).
    scale = (2.0 if config.data.centered else 1.0) / 255.0
    assert stats["num_images"] == 40 and stats["exact"] is False  # 64 > 40: a lower bound
    assert stats["sigma_max"] == pytest.approx(brute_force_max(train[:40])[0] * scale, rel=1e-12)
    assert stats["dim"] == 28 * 28
    assert stats["num_scales"] == ds.num_noise_scales(stats["sigma_max"], 0.01, 784)
    assert stats["fid_stats_path"].endswith("fashionmnist_stats.npz")
    assert f"--config.model.num_scales={stats['num_scales']}" in proc.stdout
    assert "--config.model.sigma_max=" in proc.stdout and "--config.sampling.snr=" in proc.stdout


def test_data_stats_exact_over_the_whole_split(tmp_path, data_dir):
    train = read_idx(os.path.join(data_dir, "train-images-idx3-ubyte.gz"))
    config = tiny_test.get_config()
    config.data.data_dir = data_dir
    stats = ds.data_stats(config, str(tmp_path))
    assert stats["num_images"] == 64 and stats["exact"] is True
    assert stats["sigma_max"] == pytest.approx(brute_force_max(train)[0] / 255.0, rel=1e-12)
    assert json.loads((tmp_path / "data_stats.json").read_text())["sigma_max"] == \
        stats["sigma_max"]
