"""Helpers for end-to-end tests that run main.py in subprocesses, as a user would.

The runs use the tiny config on a small Fashion-MNIST subset that `fashion_subset` writes as
IDX files, so each run takes seconds after compilation. The subprocesses share a persistent
compilation cache (the runs compile the same programs) and skip XLA's expensive optimizations:
with a tiny model and a handful of steps compiling dominates, and every run being compared uses
the same flags.
"""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
# The session's cache folder (conftest.py sets it for all xdist workers), else one of our own.
CACHE_ENV = "SCORE_SDE_TEST_JAX_CACHE"
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2",
       "JAX_COMPILATION_CACHE_DIR": (os.environ.get(CACHE_ENV)
                                     or tempfile.mkdtemp(prefix="score_sde_jax_cache_")),
       "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()}
# Training arguments shared by the runs that are compared with each other.
TRAIN = ("--config.training.n_iters=12", "--config.training.snapshot_freq=6",
         "--config.training.snapshot_freq_for_preemption=2")


def write_idx(path, array):
    dtype_code = {np.uint8: 0x08}[array.dtype.type]
    header = struct.pack(">HBB", 0, dtype_code, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data[4 + 4 * ndim:], np.uint8).reshape(shape)


def write_fashion_subset(folder, n_train=64, n_test=32):
    """The first images of the real Fashion-MNIST train and test splits, as IDX files."""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = read_idx(f"{FASHION}/{split}-images-idx3-ubyte.gz")[:n]
        labels = read_idx(f"{FASHION}/{split}-labels-idx1-ubyte.gz")[:n]
        write_idx(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"),
                  np.ascontiguousarray(images))
        write_idx(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"),
                  np.ascontiguousarray(labels))
    return str(folder)


def main_args(mode, workdir, data_dir, *overrides, config="tiny_test.py"):
    return [sys.executable, os.path.join(ROOT, "main.py"), f"--mode={mode}",
            f"--config={os.path.join(ROOT, 'configs', config)}",
            f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *overrides]


def run(args, timeout=900, ok=True, env=None, **kwargs):
    """Runs a command; with `ok`, asserts exit code 0 and shows stderr's tail otherwise."""
    proc = subprocess.run(args, cwd=ROOT, env=env or ENV, capture_output=True, text=True,
                          timeout=timeout, **kwargs)
    if ok:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def start(args, env=None, **kwargs):
    return subprocess.Popen(args, cwd=ROOT, env=env or ENV, **kwargs)


def restore_tree(path):
    """The raw array tree of an Orbax checkpoint folder (checkpoint_<k> or a meta step)."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(os.path.join(path, "default"))


def meta_steps(workdir):
    folder = os.path.join(workdir, "checkpoints-meta")
    if not os.path.isdir(folder):
        return []
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit())


def assert_trees_equal(a, b):
    import jax

    leaves_a = jax.tree_util.tree_leaves_with_path(a)
    leaves_b = jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
    for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))
