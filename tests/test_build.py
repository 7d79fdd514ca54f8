"""The build layer (run_lib.build) and the one jit helper of programs (run_lib.steps.program)."""

import jax
import jax.numpy as jnp
import numpy as np

import sampling
from configs import tiny_test
from run_lib import build, controllable, devices, generate, logs, steps


def test_program_replicates_params_and_splits_the_batch():
    mesh = devices.make_mesh()

    def fn(rng, params, model_state, x, y):
        return x * params["w"] + model_state + y, jnp.sum(x) + jax.random.uniform(rng)

    program = steps.program(fn, mesh, "a test program", batch_args=2,
                            out=("batch", "replicated"))
    assert isinstance(program, logs.CompiledOnFirstCall)
    n = 2 * jax.device_count()
    x, y = np.arange(n, dtype=np.float32), np.ones(n, np.float32)
    key = jax.random.PRNGKey(0)
    out, total = program(key, {"w": np.float32(3.0)}, np.float32(0.5), x, y)
    np.testing.assert_allclose(np.asarray(out), 3 * x + 1.5)
    np.testing.assert_allclose(float(total), x.sum() + float(jax.random.uniform(key)), rtol=1e-6)
    assert out.sharding.is_equivalent_to(devices.batch_sharded(mesh), 1)
    assert total.sharding.is_equivalent_to(devices.replicated(mesh), 0)


def test_program_of_a_host_method_runs_unjitted():
    def fn(rng, params, model_state, x):
        return np.asarray(x) * params  # numpy on the input: fails under jit

    program = steps.program(fn, devices.make_mesh(), "host", batch_args=1, host=True)
    np.testing.assert_array_equal(program(None, 2.0, None, jnp.arange(3.0)), [0.0, 2.0, 4.0])


def test_pc_settings_is_the_one_reading_of_the_pc_sampler_config():
    config = tiny_test.get_config()
    sc = config.sampling
    sc.predictor, sc.corrector, sc.snr, sc.n_steps_each = "euler_maruyama", "ald", 0.07, 2
    sc.probability_flow, sc.noise_removal = True, False
    assert sampling.pc_settings(config) == dict(
        predictor="euler_maruyama", corrector="ald", snr=0.07, n_steps=2, probability_flow=True,
        denoise=False)


def test_build_names_stay_importable_from_their_old_modules():
    from run_lib.steps import build_step_fns, get_sample_fn

    assert build_step_fns is build.build_step_fns and get_sample_fn is build.get_sample_fn
    for name in ("build", "get_score_fn", "get_bpd_fn"):
        assert getattr(steps, name) is getattr(build, name)
    assert generate.get_sample_fn is build.get_sample_fn
    assert controllable.conditional.__module__ == "run_lib.guided"
    assert generate.likelihood_mode.__module__ == "run_lib.bits_per_dim"
