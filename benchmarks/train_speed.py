"""Training throughput: steps/s, images/s and peak memory of the jitted, sharded train step.

Runs each (config, n_jitted_steps) case in its own subprocess so that peak memory is the
case's own, and prints a table with the n_jitted_steps=5 / n_jitted_steps=1 ratio.

  python benchmarks/train_speed.py                       # quickstart + CIFAR-10 NCSN++
  python benchmarks/train_speed.py --cifar_batch=32      # on a GPU, a larger batch

Peak memory is the process's maximum resident set on CPU, the allocator's peak on GPU.
The data are random (the input pipeline is not part of the figure).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CASES = {
    "quickstart": "configs.vp.fashion_mnist_ddpmpp_quickstart",
    "cifar10_ncsnpp_continuous": "configs.ve.cifar10_ncsnpp_continuous",
}


def run_case(module, batch, n_jitted, steps):
    import importlib

    import jax
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import losses
    import run_lib
    import sde_lib
    from models import utils as mutils

    config = importlib.import_module(module).get_config()
    config.training.batch_size = batch
    config.training.n_jitted_steps = n_jitted
    mesh = run_lib.make_mesh()
    state = run_lib.init_state(config, jax.random.PRNGKey(0), NamedSharding(mesh, P()))
    sde = sde_lib.get_sde(config)
    model = mutils.create_model(config)
    train_step, _ = run_lib.build_step_fns(config, sde, model, losses.get_optimizer(config),
                                           mesh)
    size, channels = config.data.image_size, config.data.num_channels
    batch_data = np.random.RandomState(0).uniform(
        -1, 1, (n_jitted, batch, size, size, channels)).astype(np.float32)
    batch_data = run_lib._to_global(batch_data, NamedSharding(mesh, P(None, "data")))
    t0 = time.time()
    state, loss = train_step(state, batch_data)
    jax.block_until_ready(loss)
    compile_s = time.time() - t0
    calls = max(1, steps // n_jitted)
    t0 = time.time()
    for _ in range(calls):
        state, loss = train_step(state, batch_data)
    jax.block_until_ready(loss)
    seconds = time.time() - t0
    device = jax.devices()[0]
    if device.platform == "cpu":
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    else:
        peak = (device.memory_stats() or {}).get("peak_bytes_in_use", 0)
    steps_per_s = calls * n_jitted / seconds
    return {"case": module.split(".")[-1], "platform": device.platform,
            "devices": jax.device_count(), "batch": batch, "n_jitted_steps": n_jitted,
            "params": mutils.count_params(state.params), "compile_s": compile_s,
            "steps_per_s": steps_per_s, "images_per_s": steps_per_s * batch,
            "peak_mib": peak / 2**20}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--quickstart_batch", type=int, default=32)
    parser.add_argument("--cifar_batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--n_jitted", default="1,5")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        module, batch, n_jitted = args.child.split(":")
        print("RESULT " + json.dumps(run_case(module, int(batch), int(n_jitted), args.steps)),
              flush=True)
        return

    rows = []
    for case in args.cases.split(","):
        batch = args.quickstart_batch if case == "quickstart" else args.cifar_batch
        for n_jitted in (int(k) for k in args.n_jitted.split(",")):
            child = f"{CASES[case]}:{batch}:{n_jitted}"
            out = subprocess.run([sys.executable, __file__, f"--child={child}",
                                  f"--steps={args.steps}"], cwd=ROOT, capture_output=True,
                                 text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
            lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode != 0 or not lines:
                print(f"{child} failed:\n{out.stderr[-2000:]}")
                continue
            row = json.loads(lines[-1][len("RESULT "):])
            rows.append(row)
            print(f"{row['case']:<28} {row['platform']} x{row['devices']}  batch {row['batch']:>3}"
                  f"  n_jitted {row['n_jitted_steps']}  params {row['params']:,}  compile "
                  f"{row['compile_s']:6.1f} s  {row['steps_per_s']:7.3f} steps/s  "
                  f"{row['images_per_s']:8.2f} img/s  peak {row['peak_mib']:7.0f} MiB",
                  flush=True)
    for case in {r["case"] for r in rows}:
        by_k = {r["n_jitted_steps"]: r for r in rows if r["case"] == case}
        if 1 in by_k and 5 in by_k:
            print(f"{case}: n_jitted_steps 5 / 1 throughput ratio "
                  f"{by_k[5]['steps_per_s'] / by_k[1]['steps_per_s']:.2f}")


if __name__ == "__main__":
    main()
