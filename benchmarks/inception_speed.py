"""Throughput of FID Inception feature extraction (images/s), random weights.

    JAX_PLATFORMS=cpu python benchmarks/inception_speed.py            # ~1.5 min on 2 cores
    python benchmarks/inception_speed.py --batch=256 --repeats=5       # on a GPU

Times `get_inception_model(variables=random)` on uint8 inputs of 32x32 (CIFAR-10) and
256x256 (LSUN / CelebA-HQ); both are resized to 299x299 inside, so the network cost is
the same and the difference is the resize and the host-to-device transfer. The first
call (compile) is reported separately; figures are the median of the timed repeats.
"""

import argparse
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])

import evaluation  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=None,
                        help="images per call (default 16 on CPU, 256 on GPU)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--precision", choices=["highest", "default"], default="highest")
    args = parser.parse_args()

    platform = jax.devices()[0].platform
    batch = args.batch or (16 if platform == "cpu" else 256)
    precision = (jax.lax.Precision.HIGHEST if args.precision == "highest"
                 else jax.lax.Precision.DEFAULT)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({platform}); "
          f"batch {batch}; precision {args.precision}")

    inception = evaluation.get_inception_model(
        variables=evaluation.init_random_variables(0), precision=precision)
    rng = np.random.default_rng(0)
    for size in args.sizes:
        images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
        start = time.perf_counter()
        jax.block_until_ready(inception(images))
        first = time.perf_counter() - start
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            jax.block_until_ready(inception(images))
            times.append(time.perf_counter() - start)
        step = statistics.median(times)
        print(f"{size:4d}x{size:<4d} uint8 -> 299: {batch / step:8.1f} images/s "
              f"({step * 1e3:.0f} ms per batch of {batch}; first call incl. compile "
              f"{first:.1f} s)")


if __name__ == "__main__":
    main()
