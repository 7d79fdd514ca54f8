"""Entry point: `python main.py --mode=MODE --config=CONFIG --workdir=DIR`.

Config values are overridden with `--config.a.b=value`; the config is locked, so a
misspelled key stops the run at once. `--config.plugins=my_sde.py,...` loads a researcher's own
SDEs, samplers and networks (docs/extending.md). Several hosts: set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under a cluster that jax.distributed detects)
and start the same command on every host.

Bad input (flags, config files, config values, data, workdir) ends with one line `error: ...`
and exit code 2; a run that cannot go on (damaged checkpoint, diverged loss, full disk) with one
line and exit code 1; Ctrl-C stops at the next safe point with exit code 130.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections.config_flags import config_flags

from configs import plugins
from run_lib import modes

# Before TensorFlow is first imported: its C++ start-up lines are not the run's.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
# config.plugins are imported as the config file loads, before the --config.* overrides.
plugins.install(FLAGS["config"])
flags.DEFINE_string("workdir", None, "Work directory: checkpoints, samples, logs.")
# run_lib.modes imports no JAX: --help and a bad --mode answer at once.
flags.DEFINE_enum("mode", None, modes.NAMES, "Running mode.")
flags.DEFINE_string("eval_folder", "eval", "Folder (inside workdir) for evaluation outputs.")
flags.mark_flags_as_required(["config", "workdir", "mode"])

USAGE_EXIT, FAILURE_EXIT, INTERRUPT_EXIT = 2, 1, 130


def _fail(message: str, code: int):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def _config_error(e: BaseException) -> str:
    """One line for the ways a config file or override fails to load."""
    if isinstance(e, SyntaxError):
        return f"syntax error in config file {e.filename}, line {e.lineno}: {e.msg}"
    text = str(e.args[0]) if e.args else str(e)
    text = text.strip("'\"").replace("\\n", "\n").replace("\\'", "'")
    if "Did you mean" in text or isinstance(e, (AttributeError, KeyError)):
        key, _, hint = text.partition("\n")
        return f"unknown config key {key.strip(chr(39))!r}" + (f" ({hint.strip()})" if hint
                                                                 else "")
    if "Failed loading config file" in text:
        attempted = [line.strip() for line in text.splitlines() if "Errno" in line]
        return ("cannot load the config file given by --config: "
                + (attempted[-1] if attempted else text.splitlines()[0]))
    return " ".join(text.split())


def _check_config_file(argv) -> None:
    """Exit 2 with one line if --config names no file, before anything slow is imported."""
    for i, arg in enumerate(argv[1:], start=1):
        if arg.startswith("--config="):
            value = arg[len("--config="):]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        # ml_collections allows `file.py:argument`; the part before the colon is the file then.
        path = value if os.path.exists(value) else value.split(":", 1)[0]
        if os.path.isdir(path):
            _fail(f"--config={value} is a folder; expected a config file, e.g. "
                  "configs/ve/cifar10_ncsnpp_continuous.py.", USAGE_EXIT)
        if not os.path.isfile(path):
            _fail(f"--config={value}: no such config file (looked for {os.path.abspath(path)}).",
                  USAGE_EXIT)


def parse_flags(argv):
    """absl's flag parsing, with one line and exit code 2 instead of a traceback."""
    _check_config_file(argv)
    try:
        rest = FLAGS(argv)
        FLAGS.config  # noqa: B018 (loads the config file and applies the overrides)
        plugins.record(FLAGS.config, FLAGS.workdir)  # the workdir's recorded ones included
    except plugins.PluginError as e:
        _fail(str(e), USAGE_EXIT)
    except flags.Error as e:
        _fail(str(e), USAGE_EXIT)
    except Exception as e:  # noqa: BLE001 (config files may raise anything)
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:
            if isinstance(cause, SyntaxError):
                break
            cause = cause.__cause__ or cause.__context__
        _fail(_config_error(cause if isinstance(cause, SyntaxError) else e), USAGE_EXIT)
    return rest


def _maybe_initialize_distributed():
    import jax  # here for the same reason as backend below

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]))


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments: {argv[1:]}", USAGE_EXIT)
    _maybe_initialize_distributed()
    # Imported here, not at the top: backend and run_lib's modules pull in TensorFlow and JAX
    # (seconds), and flag errors and --help should answer at once (run_lib itself is light).
    import backend
    import run_lib

    # Before JAX starts its threads (at the first use of a device): on XLA:CPU freed memory
    # serves the next allocations, so each train step reuses the previous step's pages.
    backend.configure_host_memory()
    # The project's INFO lines always show; other libraries' only with --verbosity=1.
    verbose = FLAGS.verbosity >= 1
    logging.set_verbosity(max(FLAGS.verbosity, logging.INFO))
    run_lib.logs.install_filter(verbose=verbose)
    try:
        with run_lib.interrupt.graceful_sigint():
            modes.load(FLAGS.mode)(FLAGS.config, FLAGS.workdir, FLAGS.eval_folder)
    except run_lib.USAGE_ERRORS as e:
        _fail(str(e), USAGE_EXIT)
    except run_lib.RUN_ERRORS as e:
        _fail(str(e), FAILURE_EXIT)
    except (run_lib.Interrupted, KeyboardInterrupt) as e:
        _fail(str(e) or "interrupted.", INTERRUPT_EXIT)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
