"""Process-wide JAX setup of a run: the persistent compilation cache and glibc's handling of
freed host memory (reused by the next step, returned to the OS after compiling). The CPU
compiler options are `models.utils.compiler_options`.

The persistent cache stores every compiled program that took at least a second to compile
under `config.training.compile_cache_dir` (default `$SCORE_SDE_CACHE/xla`, else
`~/.cache/score_sde/xla`), keyed by the program, the jax/jaxlib versions, the device and the
XLA flags; a restarted or resumed run loads its train step, sampler and initializer instead of
compiling them again. '' turns the cache off; the JAX_COMPILATION_CACHE_DIR environment
variable, when set, takes precedence (as in JAX itself).
"""

from __future__ import annotations

import ctypes
import os

import jax


def default_compile_cache_dir() -> str:
    """$SCORE_SDE_CACHE/xla, else ~/.cache/score_sde/xla."""
    root = os.environ.get("SCORE_SDE_CACHE") or os.path.join(os.path.expanduser("~"),
                                                             ".cache", "score_sde")
    return os.path.join(root, "xla")


def setup_compile_cache(cache_dir: str | None, min_compile_time_secs: float = 1.0) -> str:
    """Turns JAX's persistent compilation cache on in `cache_dir` ('' or None: off; 'auto':
    default_compile_cache_dir()).

    Returns the directory in use ('' when off). Call before the first compilation.
    """
    env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    if env:
        cache_dir = env
    if not cache_dir:
        return ""
    if cache_dir == "auto":
        cache_dir = default_compile_cache_dir()
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    os.makedirs(cache_dir, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_secs)
    return cache_dir


def release_host_memory() -> None:
    """Returns freed heap pages to the OS (glibc keeps them; XLA's compiler frees gigabytes)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def reuse_freed_host_memory() -> bool:
    """Makes freed memory serve the next allocations instead of going back to the OS at once.

    XLA:CPU allocates a program's temporaries as one block per call (0.9 GB for the CIFAR-10
    NCSN++ step at batch 8) on its own threads; glibc serves a block that large with a fresh
    mmap and unmaps it when freed, so every step faults ~250,000 zeroed pages in again. With
    one arena, no mmap for large blocks and no automatic trimming, the block is reused from
    the heap; memory goes back to the OS at `release_host_memory()`. Call before JAX starts
    its threads. Returns whether glibc accepted the settings.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return all(mallopt(param, value) == 1 for param, value in (
        (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
