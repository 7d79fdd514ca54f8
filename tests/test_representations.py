"""Encode, decode, interpolate (Song et al. 2021, Sec. 4.3): the probability-flow ODE's encoding
of Gaussian data against its closed form and its inverse; slerp; and the three modes of main.py
on the tiny trained model (run_lib.encoding, run_lib.decoding, run_lib.interpolation)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from gaussian_utils import GaussianMixture
from run_helpers import main_args, run

import likelihood
import sampling
import sde_lib
from configs import tiny_test
from run_lib import checks, decoding, encoding, interpolation
from run_lib.interpolation import slerp

SHAPE = (3, 4, 4, 2)
MEAN, STD = 0.3, 0.2


@pytest.mark.parametrize("method", ["dopri5", "RK45"])
def test_encode_then_decode_gaussian_data(method):
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=3.0)
    dim = int(np.prod(SHAPE[1:]))
    data = GaussianMixture.gaussian(np.full(dim, MEAN), STD)
    score_fn = data.score_fn(sde)
    x = np.asarray(data.sample(jax.random.PRNGKey(0), SHAPE[0])).reshape(SHAPE)
    identity = lambda v: v  # noqa: E731
    encode = likelihood.get_likelihood_fn(sde, identity, rtol=1e-6, atol=1e-6, method=method,
                                          eps=encoding.EPS)
    _, z, _ = encode(jax.random.PRNGKey(1), score_fn, x)
    # The flow of a Gaussian is affine: x(t) - mean grows like the marginal std
    # sqrt(STD^2 + sigma(t)^2).
    sigma = lambda t: sde.marginal_prob(np.zeros((1,)), np.full((1,), t))[1][0]  # noqa: E731
    ratio = np.sqrt((STD ** 2 + sigma(1.0) ** 2) / (STD ** 2 + sigma(encoding.EPS) ** 2))
    np.testing.assert_allclose(np.asarray(z), MEAN + (x - MEAN) * ratio, rtol=1e-4, atol=1e-4)
    decode = sampling.get_ode_sampler(sde, SHAPE, identity, denoise=False, rtol=1e-6,
                                      atol=1e-6, method=method, eps=encoding.EPS)
    back, _ = decode(jax.random.PRNGKey(2), score_fn, z)
    # Decoding inverts encoding up to the solver's tolerance (x is ~0.3, z ~3).
    np.testing.assert_allclose(np.asarray(back), x, atol=2e-4)


def test_slerp_endpoints_norms_and_angles():
    rng = np.random.default_rng(0)
    z0 = rng.standard_normal((3, 5, 5, 2))
    z1 = rng.standard_normal((3, 5, 5, 2))
    # Equal norms, as for two latents of a high-dimensional Gaussian prior.
    z1 *= (np.linalg.norm(z0.reshape(3, -1), axis=1) / np.linalg.norm(z1.reshape(3, -1),
                                                                       axis=1))[:, None, None,
                                                                                None]
    alphas = np.linspace(0, 1, 7)
    path = slerp(z0, z1, alphas)
    assert path.shape == (3, 7, 5, 5, 2) and path.dtype == np.float32
    np.testing.assert_allclose(path[:, 0], z0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(path[:, -1], z1, rtol=1e-6, atol=1e-6)
    flat, f0, f1 = path.reshape(3, 7, -1), z0.reshape(3, -1), z1.reshape(3, -1)
    norms = np.linalg.norm(flat, axis=-1)
    np.testing.assert_allclose(norms, np.linalg.norm(f0, axis=1)[:, None] * np.ones(7),
                               rtol=1e-5)

    def angle(a, b):
        return np.arccos(np.clip(np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1)
                                                      * np.linalg.norm(b, axis=-1)), -1, 1))

    omega = angle(f0, f1)
    np.testing.assert_allclose(angle(flat, f0[:, None]), alphas[None] * omega[:, None],
                               atol=5e-4)  # arccos near 1 of float32 vectors
    # Parallel latents fall back to linear interpolation.
    np.testing.assert_allclose(slerp(z0, 2 * z0, np.array([0.5]))[:, 0], 1.5 * z0, rtol=1e-5)


def test_reconstruction_error():
    x = np.zeros((2, 4, 4, 1), np.uint8)
    y = x.copy()
    assert decoding.reconstruction_error(x, y)["psnr"] == float("inf")
    y[0, 0, 0, 0] = 3
    err = decoding.reconstruction_error(x, y)
    assert err["max_error"] == 3
    assert err["psnr"] == pytest.approx(10 * np.log10(255 ** 2 / (9 / 32)))
    np.testing.assert_array_equal(decoding.to_uint8(np.array([0.0, 0.4999 / 255, 0.5001 / 255,
                                                               1.2])), [0, 0, 1, 255])


def test_temperature_and_steps_are_checked_before_anything_runs():
    config = tiny_test.get_config()
    config.controllable.temperature = 0.0
    with pytest.raises(checks.ConfigError, match="controllable.temperature=0.0"):
        checks.validate_config(config, "decode")
    config.controllable.temperature, config.controllable.interpolation_steps = 1.0, 1
    with pytest.raises(checks.UsageError, match="interpolation_steps=1"):
        interpolation.interpolate(config, "/nonexistent")


def test_encode_decode_interpolate_through_main(tmp_path, trained, data_dir):
    workdir = str(tmp_path / "run")
    shutil.copytree(trained["straight"], workdir)
    run(main_args("encode", workdir, data_dir, "--config.controllable.num_inputs=4"))
    folder = os.path.join(workdir, "encode", "ckpt_2")
    with np.load(os.path.join(folder, "latents.npz")) as f:
        latents = {k: f[k] for k in f.files}
    assert latents["x"].dtype == np.uint8 and latents["x"].shape == (4, 28, 28, 1)
    assert latents["z"].dtype == np.float32 and latents["z"].shape == (4, 28, 28, 1)
    assert latents["bpd"].shape == (4,) and np.all(np.isfinite(latents["bpd"]))
    source = os.path.join(folder, "latents.npz")
    run(main_args("decode", workdir, data_dir, f"--config.controllable.source={source}"))
    out = os.path.join(workdir, "decode", "ckpt_2")
    with np.load(os.path.join(out, "samples.npz")) as f:
        samples = f["samples"]
    assert samples.dtype == np.uint8 and samples.shape == (4, 28, 28, 1)
    assert os.path.isfile(os.path.join(out, "samples.png"))
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    assert summary["max_error"] == int(np.max(np.abs(samples.astype(int) - latents["x"])))
    # Decoding inverts encoding up to the ODE tolerance (1e-5): well under one 8-bit level.
    assert summary["max_error"] <= 1
    run(main_args("interpolate", workdir, data_dir, "--config.controllable.num_inputs=4",
                  "--config.controllable.interpolation_steps=3"))
    out = os.path.join(workdir, "interpolate", "ckpt_2")
    with np.load(os.path.join(out, "interpolations.npz")) as f:
        assert f["samples"].dtype == np.uint8 and f["samples"].shape == (6, 28, 28, 1)
        np.testing.assert_array_equal(f["x"], latents["x"])
        np.testing.assert_allclose(f["alphas"], [0.0, 0.5, 1.0])
        # The ends of each path are the pair's own latents: they decode to the inputs.
        ends = f["samples"][[0, 2, 3, 5]].astype(int)
        assert np.max(np.abs(ends - latents["x"].astype(int))) <= 1
    assert all(os.path.isfile(os.path.join(out, name))
               for name in ("pair_0.png", "pair_1.png", "interpolations.png"))
