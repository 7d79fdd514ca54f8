"""Throughput and peak memory of the NCSN++ and DDPM score networks.

    python benchmarks/model_speed.py [--batch 8] [--repeats 5] \
        [--configs ve/cifar10_ncsnpp_continuous,vp/ddpm/cifar10]

For each config: compile time, forward (train=False) and forward+backward (train=True,
gradient of the mean squared output w.r.t. all parameters) images per second on the default
JAX backend, and peak memory: the device allocator's peak on GPU/TPU, the process's maximum
resident set size on CPU (monotone over the run, so later figures include earlier peaks).
Run it with JAX_PLATFORMS=cpu for CPU figures; on a GPU machine it measures the GPU.
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from models import utils  # noqa: E402


def _peak_memory_mb() -> tuple[str, float]:
    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "peak_bytes_in_use" in stats:
        return "device peak", stats["peak_bytes_in_use"] / 2**20
    # ru_maxrss is in kilobytes on Linux.
    return "process max RSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _labels(config, batch):
    m = config.model
    if m.name == "ncsnpp" and m.embedding_type == "fourier":
        return jnp.linspace(m.sigma_min, m.sigma_max, batch)
    if m.scale_by_sigma:
        return jnp.arange(batch, dtype=jnp.float32) % m.num_scales
    return jnp.linspace(0.0, 999.0, batch)


def _time(fn, args, repeats):
    jax.block_until_ready(fn(*args))  # warm-up (after compilation)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats


def benchmark(name: str, batch: int, repeats: int) -> None:
    config = importlib.import_module("configs." + name.replace("/", ".")).get_config()
    model = utils.create_model(config)
    size, channels = config.data.image_size, config.data.num_channels
    x = jax.random.uniform(jax.random.PRNGKey(1), (batch, size, size, channels))
    t = _labels(config, batch)

    start = time.perf_counter()
    variables = jax.jit(lambda key: model.init(key, x[:1], t[:1], train=False))(
        jax.random.key(0, impl="rbg"))
    params = variables["params"]
    print(f"[{name}] {config.model.name}, {utils.count_params(params):,} parameters, "
          f"{size}x{size}x{channels}, batch {batch}, init {time.perf_counter() - start:.1f}s",
          flush=True)

    forward = jax.jit(lambda p, x: model.apply({"params": p}, x, t, train=False))

    def loss(p, x, rng):
        out = model.apply({"params": p}, x, t, train=True, rngs={"dropout": rng})
        return jnp.mean(out ** 2)

    backward = jax.jit(jax.grad(loss))
    rng = jax.random.PRNGKey(2)

    for label, fn, args in [("forward", forward, (params, x)),
                            ("forward+backward", backward, (params, x, rng))]:
        start = time.perf_counter()
        compiled = fn.lower(*args).compile()
        compile_s = time.perf_counter() - start
        seconds = _time(compiled, args, repeats)
        mem_kind, mem = _peak_memory_mb()
        print(f"[{name}] {label:17s} compile {compile_s:6.1f}s  {seconds * 1e3:9.1f} ms/batch  "
              f"{batch / seconds:8.2f} images/s  {mem_kind} {mem:,.0f} MiB", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--configs", default="ve/cifar10_ncsnpp_continuous,vp/ddpm/cifar10")
    args = parser.parse_args(argv)
    device = jax.devices()[0]
    print(f"backend {jax.default_backend()}, device {device.device_kind}, "
          f"{os.cpu_count()} host cores, jax {jax.__version__}", flush=True)
    for name in args.configs.split(","):
        benchmark(name.strip(), args.batch, args.repeats)


if __name__ == "__main__":
    main()
