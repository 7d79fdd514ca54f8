"""Ctrl-C that stops a run cleanly: the first SIGINT asks the loops to stop at the next safe
point (between steps, batches, rounds or parts of a sampling loop, never inside a save); a
second one stops at once.

The first Ctrl-C is acknowledged on stderr at once, even while the main thread waits inside a
long compiled call (where Python's own handler cannot run until the call returns): the signal
also wakes a small thread that prints the line (`signal.set_wakeup_fd`).
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading

_requested = threading.Event()
_acknowledged = threading.Event()

ACK = ("Ctrl-C: stopping at the next safe point (finished work is kept; the same command "
       "resumes); Ctrl-C again to stop without waiting.")


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


def _watch(reader: socket.socket):
    """Prints the acknowledgement when the C-level handler writes SIGINT's number."""
    while True:
        try:
            data = reader.recv(64)
        except OSError:
            return
        if not data:
            return
        if signal.SIGINT in data:
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
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    try:
        previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):  # not supported here: the handler acknowledges instead
        previous_fd = None
    watcher = threading.Thread(target=_watch, args=(reader,), daemon=True,
                               name="ctrl-c-acknowledgement")
    watcher.start()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if previous_fd is not None:
            signal.set_wakeup_fd(previous_fd)
        writer.close()
        reader.shutdown(socket.SHUT_RDWR)
        reader.close()
