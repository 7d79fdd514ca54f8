"""The project's train step (losses.get_step_fn, jitted with the state donated and the
compiler options run_lib uses) on random data, for the benchmarks.

It is built from the library modules alone: importing run_lib imports the input pipeline and
with it TensorFlow (about 450 MB resident), which a train step does not use; on one device
run_lib's mesh sharding compiles to the same program.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np

import backend
import losses
import sde_lib
from models import utils as mutils


def _load_run_lib_module(name):
    # run_lib/runtime.py and run_lib/devices.py depend on jax and the models alone; loading
    # them by path skips run_lib/__init__.py and the TensorFlow import that comes with it.
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "run_lib", name + ".py")
    spec = importlib.util.spec_from_file_location("_score_sde_" + name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


runtime = _load_run_lib_module("runtime")
devices = _load_run_lib_module("devices")
# As main.py does before JAX starts its threads: XLA's per-step temporaries reuse mapped pages.
backend.configure_host_memory()


def build(config, seed: int = 0):
    """(train_step, state, batch [n_jitted, B, H, W, C], model) for `config`.

    train_step(state, batch) -> (state, losses) donates the state, as in training.
    """
    tc = config.training
    sde = sde_lib.get_sde(config)
    model = mutils.create_model(config)
    optimizer = losses.get_optimizer(config)
    # As run_lib initializes: a program compiled for one run and dropped with its executable,
    # whose memory goes back to the OS before the step is compiled.
    state = devices.compile_once(lambda key: losses.init_train_state(key, config)[1],
                                 jax.random.PRNGKey(seed))
    jax.block_until_ready(state)
    runtime.release_host_memory()
    # As run_lib/steps.py builds it: the backend's formulations, options and step loop.
    step = backend.jit(losses.get_step_fn(sde, model, True, optimizer,
                                          reduce_mean=tc.reduce_mean, continuous=tc.continuous,
                                          likelihood_weighting=tc.likelihood_weighting,
                                          ema_rate=config.model.ema_rate,
                                          unroll=backend.unroll_steps()),
                       donate_argnums=0)
    n, b = tc.n_jitted_steps, tc.batch_size
    size, ch = config.data.image_size, config.data.num_channels
    data = np.random.RandomState(seed).uniform(0, 1, (n, b, size, size, ch)).astype(np.float32)
    data = jax.device_put(data)
    # Compiled ahead of the first call, so the compiler's freed working memory goes back to the
    # OS before the step's own buffers are allocated (as run_lib's training loop does).
    step = step.lower(state, data).compile()
    jax.block_until_ready(state)
    runtime.release_host_memory()
    return step, state, data, model
