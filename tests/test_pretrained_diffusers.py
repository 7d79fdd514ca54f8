"""A folder written by pretrained.export_diffusers runs in diffusers itself: the UNet that
`ScoreSdeVePipeline.from_pretrained` builds gives this project's network output, and the
pipeline samples. Needs torch and diffusers (requirements-interop.txt); skipped only when they
are not installed."""

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from test_pretrained import A2, assert_trees_equal, fixture_config, relative_error  # noqa: E402

import pretrained  # noqa: E402
from models import utils as mutils  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    config = fixture_config(A2)
    loaded = pretrained.load(A2, config)
    out = pretrained.export_diffusers(config, loaded.params_ema,
                                      str(tmp_path_factory.mktemp("export") / "pipeline"))
    return config, loaded, out


def test_unet_output_equals_ours(exported):
    config, loaded, out = exported
    pipeline = diffusers.ScoreSdeVePipeline.from_pretrained(out)
    io = np.load(os.path.join(A2, "io.npz"))
    x, sigmas = io["x"], io["score_labels"]
    with torch.no_grad():
        theirs = pipeline.unet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                               torch.from_numpy(sigmas)).sample.numpy().transpose(0, 2, 3, 1)
    model = mutils.create_model(config)
    ours = np.asarray(model.apply({"params": loaded.params_ema}, x, sigmas, train=False))
    assert relative_error(theirs, ours) <= 1e-4
    assert relative_error(theirs, io["score_ema"]) <= 1e-4  # what diffusers computed itself
    scheduler = pipeline.scheduler.config
    assert (scheduler.sigma_min, scheduler.sigma_max, scheduler.num_train_timesteps) == (
        config.model.sigma_min, config.model.sigma_max, config.model.num_scales)


def test_pipeline_samples(exported):
    _, _, out = exported
    pipeline = diffusers.ScoreSdeVePipeline.from_pretrained(out)
    images = pipeline(batch_size=2, num_inference_steps=3, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 16, 16, 3)
    assert np.all(np.isfinite(images)) and images.min() >= 0 and images.max() <= 1


def test_attention_inside_a_level(tmp_path):
    # The released 256 / 1024 px models have attention inside a level (AttnSkipDown/UpBlock2D),
    # which matches the reference from 128 channels on; random weights, the fixture's inputs.
    config = fixture_config(A2)
    config.unlock()
    config.model.nf, config.model.ch_mult, config.model.attn_resolutions = 128, (1, 1), (8,)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32),
        mutils.param_shapes(config))
    out = pretrained.export_diffusers(config, params, str(tmp_path / "pipeline"))
    unet = diffusers.UNet2DModel.from_pretrained(os.path.join(out, "unet"))
    assert unet.config.down_block_types == ["SkipDownBlock2D", "AttnSkipDownBlock2D"]
    io = np.load(os.path.join(A2, "io.npz"))
    x, sigmas = io["x"], io["score_labels"]
    with torch.no_grad():
        theirs = unet(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
                      torch.from_numpy(sigmas)).sample.numpy().transpose(0, 2, 3, 1)
    ours = mutils.create_model(config).apply({"params": params}, x, sigmas, train=False)
    assert relative_error(theirs, np.asarray(ours)) <= 1e-4
    assert_trees_equal(pretrained.load(out, config).params, params)
