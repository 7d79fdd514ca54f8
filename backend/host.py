"""glibc's handling of freed host memory: reused by the next step of an XLA:CPU program, returned
to the OS after compiling. Standard library only, so that it can run before JAX starts its
threads; `backend.configure_host_memory` applies it where the backend is XLA:CPU."""

from __future__ import annotations

import ctypes


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
