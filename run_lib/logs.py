"""What a person reads: the project's own log lines, progress bars, throughput and ETA.

Third-party INFO chatter (Orbax's option dumps, TensorFlow's and XLA's start-up lines) is off by
default; `--verbosity=1` (absl's flag) turns it back on.
"""

from __future__ import annotations

import logging as py_logging
import os
import time

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

# Loggers of libraries whose INFO lines bury the project's own.
_NOISY_LOGGERS = ("orbax", "absl_orbax", "jax", "jax._src", "tensorflow", "tensorflow_datasets",
                  "etils", "h5py")


def quiet_third_party(verbose: bool = False) -> None:
    """Third-party loggers show warnings only, unless `verbose`."""
    level = py_logging.INFO if verbose else py_logging.WARNING
    for name in _NOISY_LOGGERS:
        py_logging.getLogger(name).setLevel(level)


class _ProjectOnly(py_logging.Filter):
    """Passes the project's own records and every warning; drops others' INFO lines."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record):
        if self.verbose or record.levelno >= py_logging.WARNING:
            return True
        path = record.pathname or ""
        return "site-packages" not in path and "dist-packages" not in path


def log_to_file(workdir: str, name: str = "stdout.txt") -> py_logging.Handler | None:
    """Also writes the run's log lines to `<workdir>/<name>` (host 0 only)."""
    if jax.process_index() != 0:
        return None
    os.makedirs(workdir, exist_ok=True)
    handler = py_logging.FileHandler(os.path.join(workdir, name))
    handler.setFormatter(py_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.get_absl_logger().addHandler(handler)
    return handler


def install_filter(verbose: bool = False) -> None:
    """Filters absl's stderr handler so only the project's lines and warnings show."""
    quiet_third_party(verbose)
    handler = logging.get_absl_handler()
    for existing in list(handler.filters):
        if isinstance(existing, _ProjectOnly):
            handler.removeFilter(existing)
    handler.addFilter(_ProjectOnly(verbose))


def progress(iterable, total, desc: str, enabled: bool = True):
    """A progress bar with rate and ETA on host 0 (when enabled); the iterable itself elsewhere."""
    if not (enabled and jax.process_index() == 0):
        return iterable
    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)


class Throughput:
    """Steps/s and ETA from wall-clock time between log points."""

    def __init__(self, step: int, total: int):
        self.t0, self.step0, self.total = time.time(), step, total

    def __call__(self, step: int) -> tuple[float, float]:
        now = time.time()
        rate = (step - self.step0) / max(now - self.t0, 1e-9)
        self.t0, self.step0 = now, step
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        return rate, eta


def fmt_eta(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
