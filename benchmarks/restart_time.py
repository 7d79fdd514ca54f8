"""Restart-to-first-step time with a cold and a warm persistent compilation cache.

    python benchmarks/restart_time.py [--cases quickstart,cifar10_ncsnpp_continuous]

For each case a fresh process builds the train state, compiles (or loads) the train step and
runs the first step, twice in a row against one initially empty cache directory: the first
run is a cold start (compiles and fills the cache), the second a restart (loads). The
figure is the wall time of the whole process, Python start-up included. A third run with the
cache off shows the compile cost a restart pays without it. The data are random.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CASES = {"quickstart": "configs.vp.fashion_mnist_ddpmpp_quickstart",
         "cifar10_ncsnpp_continuous": "configs.ve.cifar10_ncsnpp_continuous"}


def child(module, batch, n_jitted, cache_dir):
    import jax
    import jax_train

    from run_lib import runtime

    used = runtime.setup_compile_cache(cache_dir)
    config = importlib.import_module(module).get_config()
    if batch:
        config.training.batch_size = batch
    if n_jitted:
        config.training.n_jitted_steps = n_jitted
    step, state, data, _ = jax_train.build(config)
    state, loss = step(state, data)
    jax.block_until_ready(loss)
    entries = len(os.listdir(used)) if used else 0
    print("RESULT " + json.dumps({"cache": used, "entries": entries,
                                  "n_jitted_steps": config.training.n_jitted_steps}))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--cifar_batch", type=int, default=8)
    p.add_argument("--n_jitted", type=int, default=0,
                   help="override training.n_jitted_steps (0: the config's)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        module, batch, n_jitted, cache_dir = args.child.split(":", 3)
        child(module, int(batch), int(n_jitted), cache_dir)
        return
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    for case in args.cases.split(","):
        batch = args.cifar_batch if case != "quickstart" else 0
        cache_dir = tempfile.mkdtemp(prefix="score_sde_restart_cache_")
        for label, cache in (("cold cache", cache_dir), ("warm cache", cache_dir),
                             ("cache off", "")):
            t0 = time.time()
            spec = f"{CASES[case]}:{batch}:{args.n_jitted}:{cache}"
            out = subprocess.run([sys.executable, __file__, f"--child={spec}"], cwd=ROOT,
                                 env=env, capture_output=True, text=True)
            seconds = time.time() - t0
            lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not lines:
                print(f"{case} {label} failed:\n{out.stderr[-2000:]}")
                break
            row = json.loads(lines[-1][7:])
            print(f"{case:<28} n_jitted_steps {row['n_jitted_steps']}  {label:<10} "
                  f"{seconds:7.1f} s to the first step  ({row['entries']} cache entries)",
                  flush=True)


if __name__ == "__main__":
    main()
