"""Where the train step's resident memory goes: RSS and peak RSS after each phase.

    python benchmarks/memory_probe.py [--config ve/cifar10_ncsnpp_continuous] [--batch 8]

Phases: imports, state initialization with the step's compilation, first step, later steps.
The peak is reset (Linux /proc/self/clear_refs) before each phase, so every line shows that
phase's own high-water mark; `compiled.memory_analysis()` shows XLA's view of the step's buffers.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _status():
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def _reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def report(phase, t0):
    s = _status()
    print(f"{phase:<28} RSS {s['VmRSS'] / 2**20:8.0f} MiB   phase peak "
          f"{s['VmHWM'] / 2**20:8.0f} MiB   {time.time() - t0:6.1f} s", flush=True)
    _reset_peak()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="ve/cifar10_ncsnpp_continuous")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--compile_cache_dir", default="",
                   help="persistent compilation cache ('auto': the project's default)")
    p.add_argument("--set", action="append", default=[],
                   help="config override key=value (python literal), e.g. training.remat=True")
    args = p.parse_args()
    t0 = time.time()
    _reset_peak()
    import ast

    import jax
    import jax_train

    jax_train.runtime.setup_compile_cache(args.compile_cache_dir)
    report("imports", t0)
    config = importlib.import_module("configs." + args.config.replace("/", ".")).get_config()
    config.training.batch_size = args.batch
    config.training.n_jitted_steps = 1
    for item in args.set:
        key, value = item.split("=", 1)
        node = config
        *parents, leaf = key.split(".")
        for k in parents:
            node = node[k]
        node[leaf] = ast.literal_eval(value)
    # build() initializes the state, compiles the step ahead of its first call and returns
    # the compiler's freed memory to the OS, as training does.
    compiled, state, batch, _ = jax_train.build(config)
    jax.block_until_ready(state)
    report("init state + compile step", t0)
    mem = compiled.memory_analysis()
    if mem is not None:
        print("XLA memory analysis: " + ", ".join(
            f"{k} {getattr(mem, k) / 2**20:.0f} MiB" for k in (
                "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                "temp_size_in_bytes", "generated_code_size_in_bytes")
            if hasattr(mem, k)), flush=True)
    state, loss = compiled(state, batch)
    jax.block_until_ready(loss)
    report("first step", t0)
    for _ in range(3):
        state, loss = compiled(state, batch)
    jax.block_until_ready(loss)
    report("3 more steps", t0)


if __name__ == "__main__":
    main()
