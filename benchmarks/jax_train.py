"""The project's train step (losses.get_step_fn, jitted with the state donated, as run_lib
builds it) on random data, for the benchmarks.

It is built from the library modules alone: run_lib imports the input pipeline and with it
TensorFlow (about 450 MB resident), which a train step does not use; on one device run_lib's
mesh sharding compiles to the same program.
"""

from __future__ import annotations

import jax
import numpy as np

import losses
import sde_lib
from models import utils as mutils


def create_model(config):
    if hasattr(mutils, "create_model"):
        return mutils.create_model(config)
    return mutils.get_model(config.model.name)(config=config)


def build(config, seed: int = 0):
    """(train_step, state, batch [n_jitted, B, H, W, C], model) for `config`.

    train_step(state, batch) -> (state, losses) donates the state, as in training.
    """
    tc = config.training
    sde = sde_lib.get_sde(config)
    model = create_model(config)
    optimizer = losses.get_optimizer(config)
    init = jax.jit(lambda key: losses.init_train_state(key, config)[1])
    state = init(jax.random.PRNGKey(seed))
    step = jax.jit(losses.get_step_fn(sde, model, True, optimizer, reduce_mean=tc.reduce_mean,
                                      continuous=tc.continuous,
                                      likelihood_weighting=tc.likelihood_weighting,
                                      ema_rate=config.model.ema_rate), donate_argnums=0)
    n, b = tc.n_jitted_steps, tc.batch_size
    size, ch = config.data.image_size, config.data.num_channels
    data = np.random.RandomState(seed).uniform(0, 1, (n, b, size, size, ch)).astype(np.float32)
    return step, state, jax.device_put(data), model
