"""The device mesh and moving arrays between hosts and the mesh.

One code path for one CPU, one accelerator, many devices and many hosts: a one-axis mesh named
'data' over every device; batches are split along it, the train state is replicated.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from backend import compiler_options

# XLA options for programs that run once (initialization): optimizing them costs more
# compile time than it saves (30 s -> 7 s to compile the tiny test model's init on CPU).
RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                             "xla_llvm_disable_expensive_passes": True}


def make_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
    """Sharding of arrays whose axis `leading_axes` is the batch (e.g. 1 for [steps, B, ...])."""
    return NamedSharding(mesh, P(*([None] * leading_axes), "data"))


def to_global(local, sharding):
    """Assembles per-host arrays into one global array sharded along the batch axis."""
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def local_part(x) -> np.ndarray:
    """This host's rows of a batch-sharded global array, in global order."""
    if jax.process_count() == 1:
        return np.asarray(x)
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    unique = {s.index[0].start: np.asarray(s.data) for s in shards}
    return np.concatenate([unique[k] for k in sorted(unique)])


def gather(x) -> np.ndarray:
    """A (possibly multi-host) global array, or per-host arrays, as one numpy array everywhere."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def compile_once(fn, *args, out_shardings=None):
    """jit-compiles and runs a program that runs once, with cheap XLA optimization on CPU."""
    on_cpu = jax.devices()[0].platform == "cpu"
    lowered = jax.jit(fn, out_shardings=out_shardings).lower(*args)
    options = {**RUN_ONCE_COMPILER_OPTIONS, **compiler_options()} if on_cpu else None
    return lowered.compile(options)(*args)
