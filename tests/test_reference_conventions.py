"""Conventions of the reference (yang-song/score_sde) that published numbers depend on."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from test_models_utils import RecordingStub

import run_lib
import sde_lib
from configs import tiny_test
from configs.vp.ddpm import cifar10 as vp_ddpm_cifar10
from models import utils as mutils
from run_lib import devices, steps

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def test_ode_and_likelihood_use_continuous_labels_on_a_discrete_vp_model():
    config = vp_ddpm_cifar10.get_config()
    assert not config.training.continuous and config.training.sde == "vpsde"
    sde = sde_lib.get_sde(config)
    t = jnp.array([1e-5, 1e-3, 0.5])
    x = jnp.zeros((3, 2, 2, 1))
    std_continuous = np.asarray(sde.marginal_prob(x, t)[1])
    std_table = np.asarray(sde.sqrt_1m_alphas_cumprod)[(np.asarray(t) * 999).astype(int)]
    any_time = steps.get_score_fn(config, sde, RecordingStub(), {}, {}, any_time=True)
    pc = steps.get_score_fn(config, sde, RecordingStub(), {}, {}, any_time=False)
    # The stub outputs its label 999 t; the score is -label / std.
    np.testing.assert_allclose(any_time(x, t)[:, 0, 0, 0], -999 * t / std_continuous, rtol=1e-4)
    np.testing.assert_allclose(pc(x, t)[:, 0, 0, 0], -999 * t / std_table, rtol=1e-4)
    # At the likelihood's eps the discrete table's std (0.01) is ~10x the continuous one.
    assert std_table[0] > 9 * std_continuous[0]


def test_every_eval_batch_draws_its_own_noise():
    config = tiny_test.get_config()
    mesh = devices.make_mesh()
    sde, model = steps.build(config)
    state = run_lib.init_state(config, jax.random.PRNGKey(0), devices.replicated(mesh))
    _, eval_losses = steps.build_step_fns(config, sde, model, None, mesh)
    batch = jnp.full((1, 8, 28, 28, 1), 0.5)
    losses = [float(eval_losses(state, batch, i)[0]) for i in (0, 1, 0)]
    assert losses[0] != losses[1] and losses[0] == losses[2]


def test_reference_format_configs_validate():
    with open(os.path.join(FIXTURES, "reference_configs.json")) as f:
        references = json.load(f)
    for name, entry in references.items():
        config = ml_collections.ConfigDict(entry["config"])
        config.data.image_size = 16
        config.model.nf, config.model.ch_mult = 4, (1, 2, 2)
        config.model.attn_resolutions, config.model.num_res_blocks = (8,), 1
        if config.model.name == "ddpm":
            config.model.nf = 32
        config.training.batch_size = config.eval.batch_size = 4
        assert "ode_method" not in config.sampling, name
        run_lib.validate_config(config, "eval")
        completed = run_lib.checks.prepare(config, "train")
        assert completed.sampling.ode_method == "dopri5" and completed.eval.bpd_num_repeats == 5
        mutils.param_shapes(completed)
