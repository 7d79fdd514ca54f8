"""Training throughput: steps/s, images/s and peak memory of the jitted, sharded train step.

Runs each (config, n_jitted_steps) case in its own subprocess so that peak memory is the
case's own, and prints a table with the n_jitted_steps=5 / n_jitted_steps=1 ratio.

  python benchmarks/train_speed.py                       # quickstart + CIFAR-10 NCSN++
  python benchmarks/train_speed.py --cifar_batch=32      # on a GPU, a larger batch

Peak memory is the process's maximum resident set on CPU, the allocator's peak on GPU.
The data are random (the input pipeline is not part of the figure).

FLOPs per step come from XLA's cost analysis of the compiled step; the achieved FLOP/s are
given as a fraction of the device's peak measured in the same run, in the step's compute
precision: the best of a large matrix product, a large 3x3 convolution and that
convolution's weight gradient (so on CPU the fraction is of what XLA's own kernels reach).

  python benchmarks/train_speed.py --cases=cifar10_ncsnpp_continuous --cifar_batch=128 \
      --precision=bfloat16                               # bf16 MFU on a GPU
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


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float((cost or {}).get("flops", 0.0))


def measure_peak(precision: str, repeats: int = 5) -> dict:
    """Best achieved FLOP/s of a large matmul, a large conv and its weight gradient."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    dtype = jnp.bfloat16 if precision == "bfloat16" else jnp.float32
    on_cpu = jax.devices()[0].platform == "cpu"
    n = 2048 if on_cpu else 8192
    b, s, c = (8, 32, 256) if on_cpu else (128, 32, 512)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    a = jax.random.normal(keys[0], (n, n), dtype)
    x = jax.random.normal(keys[1], (b, s, s, c), dtype)
    w = jax.random.normal(keys[2], (3, 3, c, c), dtype)
    g = jax.random.normal(keys[3], (b, s, s, c), dtype)
    dn = ("NHWC", "HWIO", "NHWC")

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn,
                                        preferred_element_type=jnp.float32)

    programs = {
        "matmul": (lambda a: jnp.dot(a, a, preferred_element_type=jnp.float32), (a,)),
        "conv": (conv, (x, w)),
        "conv_weight_grad": (lambda x, w, g: jax.vjp(lambda w: conv(x, w), w)[1](
            g.astype(jnp.float32))[0], (x, w, g)),
    }
    out = {}
    for name, (fn, args) in programs.items():
        compiled = jax.jit(fn).lower(*args).compile()
        flops = _flops(compiled)
        jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - t0)
        out[name] = flops / sorted(times)[len(times) // 2]
    return out


def run_case(module, batch, n_jitted, steps, precision="float32"):
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
    if precision != "float32":
        config.training.precision = precision
    mesh = run_lib.make_mesh()
    state = run_lib.init_state(config, jax.random.PRNGKey(0), NamedSharding(mesh, P()))
    sde = sde_lib.get_sde(config)
    model = mutils.create_model(config)
    train_step, _ = run_lib.build_step_fns(config, sde, model, losses.get_optimizer(config),
                                           mesh)
    size, channels = config.data.image_size, config.data.num_channels
    batch_data = np.random.RandomState(0).uniform(
        -1, 1, (n_jitted, batch, size, size, channels)).astype(np.float32)
    to_global = getattr(run_lib, "to_global", None) or run_lib._to_global
    batch_data = to_global(batch_data, NamedSharding(mesh, P(None, "data")))
    t0 = time.time()
    compiled = train_step.lower(state, batch_data).compile()
    step_flops = _flops(compiled) / n_jitted
    train_step = compiled
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
            "peak_mib": peak / 2**20, "step_flops": step_flops,
            "flops_per_s": step_flops * steps_per_s}


def _child(spec, args):
    out = subprocess.run([sys.executable, __file__, f"--child={spec}", f"--steps={args.steps}",
                          f"--precision={args.precision}"], cwd=ROOT, capture_output=True,
                         text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        print(f"{spec} failed:\n{out.stderr[-2000:]}")
        return None
    return json.loads(lines[-1][len("RESULT "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--quickstart_batch", type=int, default=32)
    parser.add_argument("--cifar_batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per case")
    parser.add_argument("--n_jitted", default="1,5")
    parser.add_argument("--precision", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "peak":
        print("RESULT " + json.dumps(measure_peak(args.precision)), flush=True)
        return
    if args.child:
        module, batch, n_jitted = args.child.split(":")
        print("RESULT " + json.dumps(run_case(module, int(batch), int(n_jitted), args.steps,
                                              args.precision)), flush=True)
        return

    peak = _child("peak", args)
    if peak:
        best = max(peak, key=peak.get)
        print("peak (" + args.precision + "): " + ", ".join(
            f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peak.items()) + f"; using {best}",
            flush=True)

    rows = []
    for case in args.cases.split(","):
        batch = args.quickstart_batch if case == "quickstart" else args.cifar_batch
        for n_jitted in (int(k) for k in args.n_jitted.split(",")):
            row = _child(f"{CASES[case]}:{batch}:{n_jitted}", args)
            if row is None:
                continue
            rows.append(row)
            mfu = (f"  {row['step_flops'] / 1e9:8.1f} GFLOP/step  "
                   f"{row['flops_per_s'] / 1e9:7.1f} GFLOP/s")
            if peak:
                mfu += f" = {100 * row['flops_per_s'] / peak[best]:5.1f}% of peak"
            print(f"{row['case']:<28} {row['platform']} x{row['devices']}  batch {row['batch']:>3}"
                  f"  n_jitted {row['n_jitted_steps']}  params {row['params']:,}  compile "
                  f"{row['compile_s']:6.1f} s  {row['steps_per_s']:7.3f} steps/s  "
                  f"{row['images_per_s']:8.2f} img/s  peak {row['peak_mib']:7.0f} MiB" + mfu,
                  flush=True)
    for case in {r["case"] for r in rows}:
        by_k = {r["n_jitted_steps"]: r for r in rows if r["case"] == case}
        if 1 in by_k and 5 in by_k:
            print(f"{case}: n_jitted_steps 5 / 1 throughput ratio "
                  f"{by_k[5]['steps_per_s'] / by_k[1]['steps_per_s']:.2f}")


if __name__ == "__main__":
    main()
