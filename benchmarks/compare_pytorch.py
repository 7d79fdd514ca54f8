"""This project against PyTorch on the same machine: CIFAR-10 NCSN++ continuous (VE), float32.

    pip install -r requirements-bench.txt        # torch (CPU) and diffusers, optional
    python benchmarks/compare_pytorch.py [--quick] [--force] [--peers ...]

Peers: this project (JAX), score_sde_pytorch's NCSN++ (a faithful port, `torch_ncsnpp.py`,
62,758,915 parameters like the reference; checked at start) and diffusers' `UNet2DModel` in
its NCSN++ configuration (61,894,924 parameters: it cannot express the residual input
pyramid). Measured, with the same batch, dtype and thread count on every side:

  forward       batch 8, images/s (eval mode, no gradient)
  train step    batch 8, images/s (loss, gradient, Adam, global-norm clipping, EMA)
  PC sampling   batch 4, N=20 reverse-diffusion + Langevin steps, steps/s
  peak RSS      of a process that only trains / only runs the forward pass, with this
                project's compiled programs loaded from its persistent compilation cache (as
                in any restarted or repeated run); the peak of a JAX process that compiles
                from scratch is printed below the table

Each peer runs in its own worker process; after compilation and warm-up the workers are
timed interleaved (one call per peer per round) and medians are printed. Peak RSS comes from
separate short processes, one per peer and mode, started after the timing workers have
filled the compilation cache (the process's maximum resident set). With each figure the
script records the 1-minute load and the CPU share that other processes took during the
timed calls: PyTorch's eager execution collapses on an oversubscribed CPU, so a comparison on
a loaded machine is not valid. The script refuses to start above a 1-minute load of
--max_load (default 1.0) unless --force is given, and marks figures taken while other
processes used more than 10% of the CPU. The first and last lines name the machine (CPU model
and vector extensions as lscpu / /proc/cpuinfo give them, core count) and the 1-minute load at
the start and at the end: the ratios depend on the CPU (e.g. AVX-512 or AVX2 only).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REFERENCE_PARAMS = {"jax": 62_758_915, "score_sde_pytorch": 62_758_915,
                    "diffusers": 61_894_924}
LABELS = {"jax": "this project", "score_sde_pytorch": "score_sde_pytorch",
          "diffusers": "diffusers"}
MEASUREMENTS = ("forward", "train", "sample")


# Vector extensions that decide how fast XLA's and PyTorch's CPU kernels run.
VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
                "avx512_bf16", "amx_tile")


def machine_summary(cpuinfo_path: str = "/proc/cpuinfo") -> dict:
    """CPU model, vector extensions and logical CPU count of this machine (Linux's
    /proc/cpuinfo, which lscpu reads; 'unknown' elsewhere)."""
    model, flags = "unknown", set()
    try:
        with open(cpuinfo_path) as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model == "unknown":
                    model = " ".join(value.split())
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    vector = [name for name in VECTOR_FLAGS if name in flags]
    return {"cpu": model, "vector": vector, "cpus": os.cpu_count()}


def machine_line(summary: dict) -> str:
    vector = ", ".join(summary["vector"]) or "none of " + ", ".join(VECTOR_FLAGS[:3])
    avx512 = "AVX-512" if any(v.startswith("avx512") for v in summary["vector"]) else \
        "no AVX-512"
    return f"machine: {summary['cpu']}, {summary['cpus']} CPUs, {avx512} ({vector})"


def _config():
    from configs.ve import cifar10_ncsnpp_continuous

    return cifar10_ncsnpp_continuous.get_config()


# ------------------------------------------------------------------------------------------
# Runners: name -> zero-argument callable that runs one measured call to completion.


def _jax_runners(args, modes):
    import jax
    import jax.numpy as jnp
    import jax_train
    import numpy as np

    import backend
    import sampling
    import sde_lib
    from models import utils as mutils

    jax_train.runtime.setup_compile_cache(args.compile_cache_dir)
    config = _config()
    config.training.batch_size = args.batch
    config.training.n_jitted_steps = 1
    runners = {}
    if "train" in modes:
        step, state, batch, model = jax_train.build(config)
        holder = {"state": state}

        def train():
            holder["state"], loss = step(holder["state"], batch)
            jax.block_until_ready(loss)
        runners["train"] = train
        # A copy: the train runner donates the state, and with it the state's buffers.
        params = (jax.tree_util.tree_map(jnp.copy, state.params_ema)
                  if set(modes) - {"train"} else state.params)
    else:
        # Forward and sampling hold the parameters only, as the PyTorch peers' processes do
        # (no optimizer moments, no EMA copy).
        model, _, params = mutils.init_model(jax.random.PRNGKey(0), config,
                                             compiler_options=backend.compiler_options())
        jax_train.runtime.release_host_memory()
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    size, ch = config.data.image_size, config.data.num_channels
    if "forward" in modes:
        x = jnp.asarray(np.random.RandomState(0).rand(args.batch, size, size, ch), jnp.float32)
        labels = jnp.linspace(config.model.sigma_min, config.model.sigma_max, args.batch)
        fwd = backend.jit(lambda p, x: model.apply({"params": p}, x, labels, train=False))
        runners["forward"] = lambda: jax.block_until_ready(fwd(params, x))
    if "sample" in modes:
        sde = sde_lib.VESDE(config.model.sigma_min, config.model.sigma_max, N=args.n_steps)
        sampler = sampling.get_pc_sampler(
            sde, (args.sample_batch, size, size, ch), "reverse_diffusion", "langevin",
            lambda v: v, snr=config.sampling.snr, n_steps=1, eps=sde.sampling_eps)

        def sample(key, params):
            # The parameters are an argument, as in run_lib: a score function closing over
            # concrete parameters would make them constants of the compiled program.
            score_fn = mutils.get_score_fn(sde, model, params, {}, train=False,
                                           continuous=True)
            return sampler(key, score_fn)[0]

        sample = backend.jit(sample)
        key = jax.random.PRNGKey(0)
        runners["sample"] = lambda: jax.block_until_ready(sample(key, params))
    return runners, n_params


def _torch_runners(peer, args, modes):
    import torch
    import torch_peers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = _config()
    model = torch_peers.make_model(peer, config)
    n_params = torch_peers.count_params(model)
    size, ch = config.data.image_size, config.data.num_channels
    x = torch.rand(args.batch, ch, size, size)
    runners = {}
    if "train" in modes:
        step = torch_peers.make_train_step(model, config)
        runners["train"] = lambda: step(x)
    if "forward" in modes:
        forward = torch_peers.make_forward(model, config)
        runners["forward"] = lambda: forward(x)
    if "sample" in modes:
        sample = torch_peers.make_pc_sampler(model, config, args.n_steps,
                                             snr=config.sampling.snr)
        runners["sample"] = lambda: sample(args.sample_batch)
    return runners, n_params


def _runners(peer, args, modes):
    if peer == "jax":
        return _jax_runners(args, modes)
    return _torch_runners(peer, args, modes)


def _cpu_seconds_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _busy_seconds():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------
# Worker processes


def _timing_worker(peer, args, conn):
    """Builds every measurement, warms up, then times one call per request."""
    try:
        runners, n_params = _runners(peer, args, MEASUREMENTS)
        for fn in runners.values():
            for _ in range(args.warmup):
                fn()
        conn.send(("ready", n_params))
        while True:
            name = conn.recv()
            if name is None:
                return
            t0 = time.perf_counter()
            runners[name]()
            conn.send(("time", time.perf_counter() - t0))
    except Exception as e:  # report, so the parent can name the failing peer
        conn.send(("error", f"{type(e).__name__}: {e}"))


def _memory_child(peer, mode, args):
    """Runs only `mode` a few times; prints the process's peak resident set."""
    runners, _ = _runners(peer, args, (mode,))
    for _ in range(args.warmup + 2):
        runners[mode]()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("RESULT " + json.dumps({"peak_rss": peak}), flush=True)


def _measure_memory(peer, mode, args, cache_dir=None):
    cache_dir = args.compile_cache_dir if cache_dir is None else cache_dir
    cmd = [sys.executable, os.path.abspath(__file__), f"--memory_child={peer}:{mode}",
           f"--batch={args.batch}", f"--sample_batch={args.sample_batch}",
           f"--n_steps={args.n_steps}", f"--threads={args.threads}", "--warmup=1",
           f"--compile_cache_dir={cache_dir}"]
    load = os.getloadavg()[0]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"memory run {peer}/{mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][7:])["peak_rss"], load


# ------------------------------------------------------------------------------------------
# Driver


def _start_workers(peers, args):
    ctx = mp.get_context("spawn")
    workers = {}
    for peer in peers:  # one at a time: compilation and warm-up must not overlap
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_timing_worker, args=(peer, args, child), daemon=True)
        proc.start()
        kind, value = parent.recv()
        if kind == "error":
            raise RuntimeError(f"peer {peer} failed to start: {value}")
        if value != REFERENCE_PARAMS[peer]:
            raise RuntimeError(f"peer {peer} has {value:,} parameters, expected "
                               f"{REFERENCE_PARAMS[peer]:,}: not the same architecture.")
        print(f"  {LABELS[peer]:<18} ready: {value:,} parameters", flush=True)
        workers[peer] = (proc, parent)
    return workers


def _timed_rounds(workers, args):
    """{measurement: {peer: [seconds]}}, and the foreign CPU share of every call."""
    times = {m: {p: [] for p in workers} for m in MEASUREMENTS}
    foreign, loads = {m: [] for m in MEASUREMENTS}, {m: [] for m in MEASUREMENTS}
    ncpu = os.cpu_count()
    for r in range(args.repeats):
        for m in MEASUREMENTS:
            for peer, (proc, conn) in workers.items():
                loads[m].append(os.getloadavg()[0])
                busy0, own0, t0 = _busy_seconds(), _cpu_seconds_of(proc.pid), time.time()
                conn.send(m)
                kind, value = conn.recv()
                if kind == "error":
                    raise RuntimeError(f"peer {peer} failed in {m}: {value}")
                wall = time.time() - t0
                other = (_busy_seconds() - busy0) - (_cpu_seconds_of(proc.pid) - own0)
                foreign[m].append(max(0.0, other) / (wall * ncpu))
                times[m][peer].append(value)
        print(f"  round {r + 1}/{args.repeats} done (1-min load {os.getloadavg()[0]:.2f})",
              flush=True)
    return times, foreign, loads


def _print_table(peers, times, foreign, loads, memory, args):
    rate = {"forward": args.batch, "train": args.batch, "sample": args.n_steps}
    names = {"forward": f"forward, batch {args.batch}, img/s",
             "train": f"train step (Adam, clip, EMA), batch {args.batch}, img/s",
             "sample": f"PC sampling, batch {args.sample_batch}, N={args.n_steps}, steps/s"}
    others = [p for p in peers if p != "jax"]
    header = ["measurement"] + [LABELS[p] for p in peers]
    if "jax" in peers and others:
        header.append("ratio (" + " / ".join(LABELS[p] for p in others) + ")")
    header += ["1-min load", "other CPU"]
    rows = []
    for m in MEASUREMENTS:
        val = {p: rate[m] / statistics.median(times[m][p]) for p in peers}
        row = [names[m]] + [f"{val[p]:.2f}" for p in peers]
        if "jax" in peers and others:
            row.append(" / ".join(f"{val['jax'] / val[p]:.2f}" for p in others))
        row += [f"{min(loads[m]):.2f}-{max(loads[m]):.2f}", f"{100 * max(foreign[m]):.0f}%"]
        rows.append(row)
    for mode in ("train", "forward"):
        if not memory:
            break
        gb = {p: memory[(p, mode)][0] / 1e9 for p in peers}
        row = [f"peak RSS, {mode}"] + [f"{gb[p]:.2f} GB" for p in peers]
        if "jax" in peers and others:
            row.append(" / ".join(f"{gb['jax'] / gb[p]:.2f}" for p in others))
        mem_loads = [memory[(p, mode)][1] for p in peers]
        row += [f"{min(mem_loads):.2f}-{max(mem_loads):.2f}", "-"]
        rows.append(row)
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    worst = max(max(v) for v in foreign.values())
    if worst > 0.10:
        print(f"\nWARNING: other processes took up to {100 * worst:.0f}% of the CPU during "
              "the timed calls; these figures do not compare the implementations fairly.")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peers", default="jax,diffusers,score_sde_pytorch")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--sample_batch", type=int, default=4)
    p.add_argument("--n_steps", type=int, default=20, help="PC sampling noise levels")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument("--quick", action="store_true", help="3 rounds, 10 sampling steps")
    p.add_argument("--no_memory", action="store_true")
    p.add_argument("--compile_cache_dir", default="auto",
                   help="this project's compilation cache ('auto': its default; '' off)")
    p.add_argument("--max_load", type=float, default=1.0)
    p.add_argument("--force", action="store_true", help="run even on a loaded machine")
    p.add_argument("--memory_child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.repeats, args.n_steps = 3, 10
    if args.memory_child:
        peer, mode = args.memory_child.split(":")
        _memory_child(peer, mode, args)
        return
    load = os.getloadavg()[0]
    machine = machine_summary()
    print(machine_line(machine), flush=True)
    print(f"{os.cpu_count()} CPUs, 1-minute load at the start {load:.2f}, torch threads "
          f"{args.threads}, XLA default threads", flush=True)
    if load > args.max_load:
        msg = (f"1-minute load {load:.2f} > {args.max_load}: the machine is busy, and "
               "PyTorch's eager execution collapses on an oversubscribed CPU.")
        if not args.force:
            raise SystemExit(f"error: {msg} Wait for an idle machine or pass --force.")
        print(f"WARNING: {msg} Figures are not a valid comparison.", flush=True)
    peers = args.peers.split(",")
    for peer in peers:
        if peer not in REFERENCE_PARAMS:
            raise SystemExit(f"error: unknown peer {peer!r}; valid: {list(REFERENCE_PARAMS)}")
    t0 = time.time()
    print("starting workers (compilation and warm-up) ...", flush=True)
    workers = _start_workers(peers, args)
    try:
        times, foreign, loads = _timed_rounds(workers, args)
    finally:
        for proc, conn in workers.values():
            conn.send(None)
            proc.join(timeout=30)
    memory, cold = {}, None
    if not args.no_memory:
        print("peak memory (one process per peer and mode) ...", flush=True)
        for mode in ("train", "forward"):
            for peer in peers:
                memory[(peer, mode)] = _measure_memory(peer, mode, args)
        if "jax" in peers:
            cold = _measure_memory("jax", "train", args, cache_dir="")
    _print_table(peers, times, foreign, loads, memory, args)
    if cold is not None:
        print(f"\nPeak RSS of a train process of this project that compiles its programs "
              f"(compilation cache off): {cold[0] / 1e9:.2f} GB.")
    end_load = os.getloadavg()[0]
    print(f"\n{args.repeats} interleaved rounds, medians; {time.time() - t0:.0f} s in all; "
          f"1-minute load at the start {load:.2f}, at the end {end_load:.2f}.")
    # One line that travels with the figures when they are copied elsewhere.
    print(f"{machine_line(machine)}; 1-minute load {load:.2f} at the start, {end_load:.2f} at "
          "the end")
    print("RECORD " + json.dumps({**machine, "load_start": load, "load_end": end_load,
                                  "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
