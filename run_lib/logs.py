"""What a person reads: the project's own log lines, progress bars, throughput and ETA.

Third-party INFO chatter (Orbax's option dumps, TensorFlow's and XLA's start-up lines) is off by
default, on the terminal and in `<workdir>/stdout.txt` alike; `--verbosity=1` (absl's flag) turns
it back on. Third-party warnings show, except the few listed in `_BENIGN` that describe what the
project asked for (e.g. Orbax announcing a checkpoint folder opened read-only).
"""

from __future__ import annotations

import contextlib
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


# Third-party warnings that are no alarm: what the project asked for, said as a warning.
# Orbax warns whenever a CheckpointManager opens a folder with read_only=True, as every mode but
# training does (run_lib.checkpoints.managers(create=False)), and about the options that
# read-only implies.
_BENIGN = ("Given directory is read only", "CheckpointManagerOptions.read_only=True")

# What install_filter was last told: log_to_file's handler filters the same way.
_verbose = False


def _third_party(record) -> bool:
    path = record.pathname or ""
    return "site-packages" in path or "dist-packages" in path


class _ProjectOnly(py_logging.Filter):
    """Passes the project's own records and others' warnings (but `_BENIGN`); drops others'
    INFO lines. `verbose` passes everything."""

    def __init__(self, verbose: bool):
        super().__init__()
        self.verbose = verbose

    def filter(self, record):
        if self.verbose or not _third_party(record):
            return True
        if record.levelno < py_logging.WARNING:
            return False
        return not str(record.msg).startswith(_BENIGN)


def log_to_file(workdir: str, name: str = "stdout.txt") -> py_logging.Handler | None:
    """Also writes the run's log lines to `<workdir>/<name>` (host 0 only)."""
    if jax.process_index() != 0:
        return None
    os.makedirs(workdir, exist_ok=True)
    path = os.path.abspath(os.path.join(workdir, name))
    logger = logging.get_absl_logger()
    for existing in list(logger.handlers):  # of an earlier run in this process
        if isinstance(existing, py_logging.FileHandler) and existing.baseFilename == path:
            logger.removeHandler(existing)
            existing.close()
    handler = py_logging.FileHandler(path)
    handler.setFormatter(py_logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    # The file gets what the terminal gets.
    handler.addFilter(_ProjectOnly(_verbose))
    logger.addHandler(handler)
    return handler


def install_filter(verbose: bool = False) -> None:
    """Filters absl's stderr handler (and the log files log_to_file opens afterwards) so only
    the project's lines and warnings show."""
    global _verbose
    _verbose = verbose
    quiet_third_party(verbose)
    # absl's own stderr handler, and absl's logger itself: in a notebook its records reach
    # whatever handler the kernel configured, not absl's.
    for target in (logging.get_absl_handler(), logging.get_absl_logger()):
        for existing in list(target.filters):
            if isinstance(existing, _ProjectOnly):
                target.removeFilter(existing)
        target.addFilter(_ProjectOnly(verbose))


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


# ---------------------------------------------------------------------------- compiling

# Programs JAX loaded from its persistent compilation cache (jax.monitoring events), counted
# so that `compiling` can say where a program came from.
_cache_hits = [0]
_listening = [False]


def _on_event(event: str, **kwargs) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _cache_hits[0] += 1


@contextlib.contextmanager
def compiling(what: str):
    """Logs `Compiling <what> ...` before the block and how long it took after it, and whether
    the program came from JAX's persistent compilation cache (run_lib.runtime)."""
    if not _listening[0]:
        jax.monitoring.register_event_listener(_on_event)
        _listening[0] = True
    hits, t0 = _cache_hits[0], time.time()
    logging.info("Compiling %s ...", what)
    yield
    seconds = time.time() - t0
    if _cache_hits[0] > hits:
        logging.info("Loaded %s from the compilation cache in %.1f s.", what, seconds)
    else:
        logging.info("Compiled %s in %.1f s.", what, seconds)


class CompiledOnFirstCall:
    """A jitted function compiled before its first call with each argument signature (shapes,
    dtypes, shardings), under `compiling(what)`, so that a run says what it compiles instead of
    falling silent; later calls with that signature run the compiled program directly."""

    def __init__(self, fn, what: str):
        self.fn, self.what, self._compiled = fn, what, {}

    @staticmethod
    def _signature(args):
        leaves, tree = jax.tree_util.tree_flatten(args)
        return tree, tuple((np.shape(x), str(getattr(x, "dtype", type(x))),
                            getattr(x, "sharding", None), getattr(x, "weak_type", None))
                           for x in leaves)

    def compile(self, *args):
        """The program for these arguments, compiled now unless it already is (on one host;
        across hosts it compiles at its first call)."""
        if jax.process_count() > 1:
            return None
        key = self._signature(args)
        if key not in self._compiled:
            with compiling(self.what):
                self._compiled[key] = self.fn.lower(*args).compile()
        return self._compiled[key]

    def __call__(self, *args):
        if jax.process_count() > 1:
            # Across hosts jit places process-local arguments (keys, scalars) itself; a compiled
            # program would not. The first call per signature is announced, compile and run.
            key = self._signature(args)
            if key in self._compiled:
                return self.fn(*args)
            self._compiled[key] = None
            with compiling(self.what + " (and its first run)"):
                return jax.block_until_ready(self.fn(*args))
        compiled = self.compile(*args)
        # As jit would: arguments moved to the shardings the program was compiled for (a no-op
        # for arrays already there).
        return compiled(*jax.device_put(args, compiled.input_shardings[0]))
