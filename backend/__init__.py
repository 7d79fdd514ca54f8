"""Per-backend tuning, behind one seam.

The networks in `models/` are plain Flax: their products, residual sums and dropout are small
parameterless modules (`models.layers.ConvProduct`, `ChannelDense`, `ResidualSum`,
`Dropout.drop`) with the plain formulation, exact-rate dropout included. Everything that is
faster on one backend only lives here, and the build layer (run_lib/steps.py,
run_lib/devices.py) switches it on where it jits a program:

* `tuned(fn)`: `fn` traced with the backend's formulations of those modules. On XLA:CPU
  (backend/cpu.py) flax method interception (`nn.intercept_methods`) replaces them with
  hand-written gradient formulations (channel products, materialized cotangents; plain inside
  rematerialized blocks) and dropout from 16-bit random words, whose drop rate is rounded to a
  multiple of 2^-16 (0.1 becomes 0.1000061). Elsewhere: `fn` itself.
* `compiler_options()`: XLA options of the large programs (XLA:CPU's memory-optimized
  scheduler); None elsewhere.
* `unroll_steps()`: whether the n_jitted_steps optimizer steps of one call are unrolled
  (XLA:CPU) or a `lax.scan` (elsewhere).
* `configure_host_memory()`: glibc's allocator settings that let XLA:CPU reuse its per-step
  temporaries (backend/host.py); `release_host_memory()` returns freed pages to the OS.
* `jit(fn, **kwargs)`: `jax.jit(tuned(fn), compiler_options=compiler_options(), **kwargs)`.

Only XLA:CPU is tuned: its formulations were measured there (backend/cpu.py). On GPU and TPU
they have not been measured, so those backends run the plain programs until a measurement on
the device says otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import jax

from backend.host import release_host_memory, reuse_freed_host_memory

__all__ = ["compiler_options", "configure_host_memory", "jit", "on_cpu",
           "release_host_memory", "tuned", "unroll_steps"]


def on_cpu() -> bool:
    """Whether JAX's default backend is XLA:CPU (the tuned one)."""
    return jax.default_backend() == "cpu"


def compiler_options() -> dict | None:
    """XLA compiler options of the large jitted programs (initialization, train step,
    samplers) on the default backend; None off CPU."""
    if not on_cpu():
        return None
    from backend import cpu
    return dict(cpu.COMPILER_OPTIONS)


def unroll_steps() -> bool:
    """Whether losses.get_step_fn unrolls its steps (XLA:CPU) instead of scanning them."""
    if not on_cpu():
        return False
    from backend import cpu
    return cpu.UNROLL_STEPS


def tuned(fn):
    """`fn`, traced with the default backend's formulations of the networks' modules (the
    CPU ones on XLA:CPU; `fn` itself elsewhere). Wrap the function a program jits."""
    if not on_cpu():
        return fn
    from backend import cpu

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with cpu.formulations():
            return fn(*args, **kwargs)

    return traced


def jit(fn, **kwargs):
    """jax.jit of `tuned(fn)` with the backend's compiler options."""
    return jax.jit(tuned(fn), compiler_options=compiler_options(), **kwargs)


_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "libtpu")


def _cpu_expected() -> bool:
    """Whether JAX will run on XLA:CPU, decided without starting JAX's backends (which starts
    its threads): JAX_PLATFORMS / jax_platforms when set, else whether an accelerator plugin
    is installed."""
    platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def configure_host_memory() -> bool:
    """Applies glibc's allocator settings for XLA:CPU (reuse_freed_host_memory) when JAX will
    run on the CPU; call before JAX starts its threads. Returns whether they were applied."""
    return _cpu_expected() and reuse_freed_host_memory()
