"""Runs a few sharded train steps of the tiny config and prints a JSON summary.

Used by tests/test_run_lib.py in subprocesses, because the device count and
jax.distributed must be set up before JAX starts:

  python tests/distributed_worker.py single            # all local devices, one process
  python tests/distributed_worker.py one_device        # the same global batch on 1 device
  python tests/distributed_worker.py multi ADDR N ID   # process ID of N via jax.distributed

Every mode trains on the same global batches; each process feeds only its own rows.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

STEPS = 3


def main():
    mode = sys.argv[1]
    if mode == "multi":
        address, num, pid = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        jax.distributed.initialize(coordinator_address=address, num_processes=num,
                                   process_id=pid)
    import run_lib
    from configs import tiny_test
    from losses import get_optimizer
    from models import utils as mutils
    from sde_lib import get_sde

    config = tiny_test.get_config()
    config.training.batch_size = 8
    devices = jax.devices()[:1] if mode == "one_device" else jax.devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))

    sde = get_sde(config)
    model = mutils.create_model(config)
    state = run_lib.init_state(config, jax.random.PRNGKey(config.seed), replicated)
    train_step, eval_losses = run_lib.build_step_fns(config, sde, model, get_optimizer(config),
                                                     mesh)
    k, B = config.training.n_jitted_steps, config.training.batch_size
    shape = (STEPS, k, B, config.data.image_size, config.data.image_size,
             config.data.num_channels)
    data = np.random.RandomState(0).uniform(-1, 1, shape).astype(np.float32)
    n_proc, pid = jax.process_count(), jax.process_index()
    rows = slice(pid * B // n_proc, (pid + 1) * B // n_proc)
    step_losses = []
    for i in range(STEPS):
        state, loss = train_step(state, run_lib.to_global(data[i][:, rows], batch_sharding))
        step_losses.extend(np.asarray(loss).tolist())
    eval_loss = np.asarray(eval_losses(state, run_lib.to_global(data[0][:, rows], batch_sharding),
                                       0))
    leaves = jax.tree_util.tree_leaves(jax.device_get(state.params))
    print("RESULT " + json.dumps({
        "devices": jax.device_count(), "processes": n_proc, "step": int(state.step),
        "losses": step_losses, "eval_loss": eval_loss.tolist(),
        "param_sums": [float(np.sum(np.abs(x), dtype=np.float64)) for x in leaves],
        "first_leaf": np.asarray(leaves[0]).ravel()[:16].tolist(),
    }), flush=True)


if __name__ == "__main__":
    main()
