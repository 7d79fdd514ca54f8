"""Entry point: `python main.py --mode=train|eval|fid_stats --config=CONFIG --workdir=DIR`.

Config values are overridden with `--config.a.b=value`; the config is locked, so a
misspelled key stops the run at once. Several hosts: set JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES and JAX_PROCESS_ID (or run under a cluster that jax.distributed detects)
and start the same command on every host.
"""

import os

from absl import app, flags, logging
from ml_collections.config_flags import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory: checkpoints, samples, logs.")
# The names of run_lib.MODES (listed here so that --help works without importing JAX).
MODES = ["train", "eval", "fid_stats"]
flags.DEFINE_enum("mode", None, MODES, "Running mode.")
flags.DEFINE_string("eval_folder", "eval", "Folder (inside workdir) for evaluation outputs.")
flags.mark_flags_as_required(["config", "workdir", "mode"])


def _maybe_initialize_distributed():
    import jax

    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    _maybe_initialize_distributed()
    # Imported here, not at the top: run_lib pulls in TensorFlow and JAX (seconds), and flag
    # errors and --help should answer at once.
    import run_lib

    config = FLAGS.config
    logging.set_verbosity(logging.INFO)
    try:
        run_lib.MODES[FLAGS.mode](config, FLAGS.workdir, FLAGS.eval_folder)
    except (run_lib.ConfigError, run_lib.CheckpointError, FileNotFoundError,
            FloatingPointError) as e:
        # Bad input or a diverged run: one clear message, no traceback.
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
