"""Process-wide JAX setup of a run: the persistent compilation cache. glibc's handling of freed
host memory (`reuse_freed_host_memory`, `release_host_memory`, kept here by name) and the CPU
compiler options live in the backend package (backend/host.py, `backend.compiler_options`).

The persistent cache stores every compiled program that took at least a second to compile
under `config.training.compile_cache_dir` (default `$SCORE_SDE_CACHE/xla`, else
`~/.cache/score_sde/xla`), keyed by the program, the jax/jaxlib versions, the device and the
XLA flags; a restarted or resumed run loads its train step, sampler and initializer instead of
compiling them again. '' turns the cache off; the JAX_COMPILATION_CACHE_DIR environment
variable, when set, takes precedence (as in JAX itself).
"""

from __future__ import annotations

import os

import jax

from backend.host import release_host_memory, reuse_freed_host_memory

__all__ = ["default_compile_cache_dir", "release_host_memory", "reuse_freed_host_memory",
           "setup_compile_cache"]


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
