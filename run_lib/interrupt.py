"""Ctrl-C that stops a run cleanly: the first SIGINT asks the loops to stop at the next safe
point (between steps, batches or rounds, never inside a save); a second one stops at once."""

from __future__ import annotations

import contextlib
import signal
import threading

_requested = threading.Event()


class Interrupted(Exception):
    """Raised by a loop that stopped at a safe point after Ctrl-C."""


def interrupted() -> bool:
    return _requested.is_set()


def _handler(signum, frame):
    if _requested.is_set():
        raise KeyboardInterrupt
    _requested.set()


@contextlib.contextmanager
def graceful_sigint():
    """Installs the two-stage Ctrl-C handler for the duration of a run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _handler)
    _requested.clear()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
