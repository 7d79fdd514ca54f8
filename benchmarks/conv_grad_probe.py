"""Per-shape timing of 3x3 convolution forward, input gradient and weight gradient on the
default JAX backend, for several formulations of the weight gradient.

    python benchmarks/conv_grad_probe.py [--batch 8] [--repeats 7] [--shapes 32:128:128,...]

Each shape is `size:c_in:c_out` (NHWC input [batch, size, size, c_in], 'SAME' 3x3 kernel).
Variants are timed interleaved (one call of each per round) and the median is printed.
Use XLA_FLAGS to compare backend options (for example --xla_cpu_use_onednn=true).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")


def conv(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)


def dw_xla(x, w, g):
    return jax.vjp(lambda w: conv(x, w), w)[1](g)[0]


def dx_xla(x, w, g):
    return jax.vjp(lambda x: conv(x, w), x)[1](g)[0]


def dw_im2col(x, w, g):
    kh, kw, ci, co = w.shape
    n, h, wd, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    cols = [xp[:, a:a + h, b:b + wd, :] for a in range(kh) for b in range(kw)]
    patches = jnp.concatenate(cols, axis=-1).reshape(n * h * wd, kh * kw * ci)
    out = jnp.dot(patches.T, g.reshape(n * h * wd, co), precision="highest")
    return out.reshape(kh, kw, ci, co)


def dw_shifted(x, w, g):
    kh, kw, ci, co = w.shape
    n, h, wd, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    g2 = g.reshape(n * h * wd, co)
    taps = [jnp.dot(xp[:, a:a + h, b:b + wd, :].reshape(-1, ci).T, g2)
            for a in range(kh) for b in range(kw)]
    return jnp.stack(taps).reshape(kh, kw, ci, co)


def dw_rowcol(x, w, g):
    # 3 matmuls: shifts along W concatenated (3 Ci wide), one matmul per kernel row.
    kh, kw, ci, co = w.shape
    n, h, wd, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    xw = jnp.concatenate([xp[:, :, b:b + wd, :] for b in range(kw)], axis=-1)
    g2 = g.reshape(n * h * wd, co)
    rows = [jnp.dot(xw[:, a:a + h].reshape(-1, kw * ci).T, g2) for a in range(kh)]
    return jnp.stack(rows).reshape(kh, kw, ci, co)


def dw_conv_cnhw(x, w, g):
    # The weight gradient as a convolution whose batch is C_in and whose features are N:
    # lhs x as [C_in, H, W, N] (batch dim C_in, feature N), rhs g as [H, W, N, C_out].
    kh, kw, ci, co = w.shape
    out = lax.conv_general_dilated(
        x, g, (1, 1), [(kh // 2, kh // 2), (kw // 2, kw // 2)],
        dimension_numbers=("CHWN", "IHWO", "HWNC"))
    return out


def _flat_grid(x, g, kh, kw):
    # x padded by the kernel halo and flattened over (batch, rows, cols), g placed on the same
    # padded grid (zeros in the halo rows/columns): tap (a, b) of the kernel gradient is then
    # one contiguous row range of x against all of g.
    n, h, wd, ci = x.shape
    hp, wp = h + kh - 1, wd + kw - 1
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh - 1 - kh // 2), (kw // 2, kw - 1 - kw // 2), (0, 0)))
    length = n * hp * wp
    extra = (kh - 1) * wp + kw - 1
    x_flat = jnp.pad(xp.reshape(length, ci), ((0, extra), (0, 0)))
    g_flat = jnp.pad(g, ((0, 0), (0, kh - 1), (0, kw - 1), (0, 0))).reshape(length, -1)
    return x_flat, g_flat, length, wp


def dw_flat_taps(x, w, g):
    kh, kw, ci, co = w.shape
    x_flat, g_flat, length, wp = _flat_grid(x, g, kh, kw)
    taps = [lax.dot_general(lax.dynamic_slice_in_dim(x_flat, a * wp + b, length), g_flat,
                            (((0,), (0,)), ((), ())))
            for a in range(kh) for b in range(kw)]
    return jnp.stack(taps).reshape(kh, kw, ci, co)


def dw_flat_taps_t(x, w, g):
    kh, kw, ci, co = w.shape
    x_flat, g_flat, length, wp = _flat_grid(x, g, kh, kw)
    taps = [lax.dot_general(g_flat, lax.dynamic_slice_in_dim(x_flat, a * wp + b, length),
                            (((0,), (0,)), ((), ())))
            for a in range(kh) for b in range(kw)]
    return jnp.transpose(jnp.stack(taps).reshape(kh, kw, co, ci), (0, 1, 3, 2))


def dw_flat_rows(x, w, g):
    # One matmul per kernel row: the kw column shifts of a row range side by side.
    kh, kw, ci, co = w.shape
    x_flat, g_flat, length, wp = _flat_grid(x, g, kh, kw)
    rows = []
    for a in range(kh):
        cols = jnp.concatenate([lax.dynamic_slice_in_dim(x_flat, a * wp + b, length)
                                for b in range(kw)], axis=1)
        rows.append(lax.dot_general(cols, g_flat, (((0,), (0,)), ((), ()))))
    return jnp.stack(rows).reshape(kh, kw, ci, co)


def _split_batch(dw_fn, chunk):
    def fn(x, w, g):
        n = x.shape[0]
        if n <= chunk or n % chunk:
            return dw_fn(x, w, g)
        parts = [dw_fn(x[i:i + chunk], w, g[i:i + chunk]) for i in range(0, n, chunk)]
        return sum(parts[1:], parts[0])
    return fn


VARIANTS = {
    "fwd": lambda x, w, g: conv(x, w),
    "dx": dx_xla,
    "dw_xla": dw_xla,
    "dw_im2col": dw_im2col,
    "dw_shifted": dw_shifted,
    "dw_rowcol": dw_rowcol,
    "dw_conv_cnhw": dw_conv_cnhw,
    "dw_flat_taps": dw_flat_taps,
    "dw_flat_taps_t": dw_flat_taps_t,
    "dw_flat_rows": dw_flat_rows,
    "dw_split1": _split_batch(dw_xla, 1),
    "dw_split2": _split_batch(dw_xla, 2),
    "dw_split4": _split_batch(dw_xla, 4),
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--shapes", default="32:128:128,32:256:128,16:256:256,16:512:256,"
                                       "8:256:256,8:512:256,4:512:256")
    p.add_argument("--variants", default=",".join(VARIANTS))
    args = p.parse_args()
    print(f"jax {jax.__version__} backend {jax.default_backend()} "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}", flush=True)
    names = args.variants.split(",")
    for spec in args.shapes.split(","):
        s, ci, co = (int(v) for v in spec.split(":"))
        k = jax.random.split(jax.random.PRNGKey(0), 3)
        x = jax.random.normal(k[0], (args.batch, s, s, ci))
        w = jax.random.normal(k[1], (3, 3, ci, co)) * 0.05
        g = jax.random.normal(k[2], (args.batch, s, s, co))
        fns = {n: jax.jit(VARIANTS[n]).lower(x, w, g).compile() for n in names}
        ref = fns["dw_xla"](x, w, g) if "dw_xla" in fns else None
        errs = {}
        for n, f in fns.items():
            out = jax.block_until_ready(f(x, w, g))
            if ref is not None and n.startswith("dw_"):
                errs[n] = float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))
        times = {n: [] for n in names}
        for _ in range(args.repeats):
            for n, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(x, w, g))
                times[n].append(time.perf_counter() - t0)
        row = "  ".join(f"{n} {statistics.median(t) * 1e3:7.2f}ms"
                        + (f" (err {errs[n]:.1e})" if n in errs and n != 'dw_xla' else "")
                        for n, t in times.items())
        print(f"{spec:>12} b{args.batch}: {row}", flush=True)


if __name__ == "__main__":
    main()
