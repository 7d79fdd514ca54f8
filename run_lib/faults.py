"""Fault-injection points, so tests can kill a run inside narrow windows (e.g. mid-save).

`SCORE_SDE_KILL_AT="<point>@<step>[,<point>@<step>...]"` makes the process SIGKILL itself when
it reaches `point` at `step` (`@*` for any step). Points named `<phase>.during` kill inside the
phase's write: a watcher kills the process as soon as the temporary files appear (for writes a
library makes, such as Orbax's), and the project's own writes also pass a `.during` point after
writing and before renaming into place, so the kill happens even if the watcher was too slow.
`SCORE_SDE_FAIL_AT` raises the error named after `=` instead, e.g.
`meta.before@4=ENOSPC` (disk full). Unset (the normal case), every call is a no-op.
"""

from __future__ import annotations

import errno
import glob
import os
import signal
import threading
import time


def _matches(spec_var: str, point: str, step) -> str | None:
    for item in filter(None, os.environ.get(spec_var, "").split(",")):
        where, _, payload = item.partition("=")
        name, _, at = where.partition("@")
        if name == point and (at in ("", "*") or (step is not None and int(at) == int(step))):
            return payload or "kill"
    return None


def _kill():
    os.kill(os.getpid(), signal.SIGKILL)


def point(name: str, step=None) -> None:
    """A fault-injection point: kills or fails here when the environment asks for it."""
    if _matches("SCORE_SDE_KILL_AT", name, step):
        _kill()
    error = _matches("SCORE_SDE_FAIL_AT", name, step)
    if error:
        code = getattr(errno, error)
        raise OSError(code, os.strerror(code), name)


def watch(name: str, step, pattern: str) -> None:
    """Kills the process once a file matching the glob `pattern` exists, if asked for `name`."""
    if not _matches("SCORE_SDE_KILL_AT", name, step):
        return

    def run():
        while not glob.glob(pattern):
            time.sleep(0.0005)
        _kill()

    threading.Thread(target=run, daemon=True).start()
