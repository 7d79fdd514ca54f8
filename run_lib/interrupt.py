"""Ctrl-C that stops a run cleanly: the first SIGINT asks the loops to stop at the next safe
point (between steps, batches, rounds or parts of a sampling loop, never inside a save); a
second one stops at once.

Both hold even while the main thread is inside a long call into a library (an XLA compilation,
a compiled sampling loop, a checkpoint write), where Python runs no signal handler until the
call returns: a watcher thread learns of each SIGINT through the interpreter's wakeup file
descriptor (`signal.set_wakeup_fd`). At the first it acknowledges the request on stderr; at the
second it prints one line and ends the process (exit code 130). That is safe: every checkpoint,
pipeline state and manifest is written under a temporary name and renamed into place, so an
exit mid-save leaves either the complete file or debris that the next start ignores and
removes, and a checkpoint without its manifest is never taken for a verified one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

_requested = threading.Event()
_acknowledged = threading.Event()
EXIT_CODE = 130
ACK = ("Ctrl-C: stopping at the next safe point (finished work is kept; the same command "
       "resumes); Ctrl-C again to stop without waiting.")
SECOND_MESSAGE = ("error: Interrupted again: stopped at once. Checkpoint writes are atomic: the "
                  "same command resumes from the newest complete checkpoint.")


class Interrupted(Exception):
    """Raised by a loop that stopped at a safe point after Ctrl-C."""


def interrupted() -> bool:
    return _requested.is_set()


def _acknowledge():
    if not _acknowledged.is_set():
        _acknowledged.set()
        print(f"\n{ACK}", file=sys.stderr, flush=True)


def _handler(signum, frame):
    if _requested.is_set():
        raise KeyboardInterrupt
    _requested.set()
    _acknowledge()


def _stop_now() -> None:
    try:
        sys.stderr.flush()
        os.write(2, (SECOND_MESSAGE + "\n").encode())
    finally:
        os._exit(EXIT_CODE)


def _watch(read_fd: int) -> None:
    """Counts the SIGINTs the interpreter reports on `read_fd`: acknowledges the first, ends
    the process at the second. A 0 byte (no signal has number 0) ends the watch."""
    seen = 0
    while True:
        try:
            data = os.read(read_fd, 64)
        except OSError:
            return
        for signum in data:
            if signum == 0:
                return
            if signum == signal.SIGINT:
                seen += 1
                if seen >= 2:
                    _stop_now()
                _acknowledge()


@contextlib.contextmanager
def graceful_sigint():
    """Installs the two-stage Ctrl-C handler for the duration of a run (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, _handler)
    _requested.clear()
    _acknowledged.clear()
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    watcher = threading.Thread(target=_watch, args=(read_fd,), name="ctrl-c-watcher",
                               daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous_fd)
        signal.signal(signal.SIGINT, previous)
        os.write(write_fd, b"\0")
        watcher.join(timeout=5)
        os.close(write_fd)
        os.close(read_fd)
