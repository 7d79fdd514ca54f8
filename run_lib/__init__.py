"""Training, evaluation and the other modes of `main.py`; owns devices, files and logs.

The library modules (sde_lib, losses, sampling, likelihood, controllable_generation,
evaluation) are pure JAX; everything they leave out lives here: the device mesh and sharding
(`devices`), checkpoints (`checkpoints`), files (`files`), logs and progress (`logs`), config
validation (`checks`), the jitted programs (`steps`), and the loops (`training`,
`evaluating`, `evaluators`). One code path serves one CPU, one GPU, several devices and several
hosts: the batch is sharded over a one-axis device mesh, the train state is replicated, and
each host reads its own shard of the data.

Workdir layout:
  config.json                      the resolved config of the run
  stdout.txt                       the run's log
  checkpoints/checkpoint_<k>       Orbax checkpoint every snapshot_freq steps (k = step / freq)
  checkpoints-meta/<step>          latest state, for preemption (plus the input-pipeline state)
  samples/iter_<step>/sample.png   snapshot sample grid (and sample.npz)
  tensorboard/                     scalars
  <eval_folder>/                   evaluation outputs and summary.json
  <mode>/ckpt_<k>/                 sample, inpaint, colorize, conditional, likelihood, encode,
                                   decode, interpolate outputs
  data_stats.json                  --mode=data_stats: sigma_max, num_scales, snr (NCSNv2)
  classifier/                      the noise-conditional classifier (--mode=train_classifier)
"""

import datasets
import evaluation
import pretrained
from run_lib import checkpoints, interrupt, logs
from run_lib.checkpoints import DiskFullError, init_state
from run_lib.checks import CheckpointError, ConfigError, UsageError, validate_config
from run_lib.classifier import train_classifier
from run_lib.controllable import colorize, conditional, inpaint
from run_lib.data_statistics import data_stats
from run_lib.decoding import decode
from run_lib.devices import make_mesh, to_global
from run_lib.encoding import encode
from run_lib.evaluating import evaluate, fid_stats
from run_lib.generate import likelihood_mode, sample
from run_lib.interop import export, import_checkpoint
from run_lib.interpolation import interpolate
from run_lib.interrupt import Interrupted
from run_lib.steps import build_step_fns, get_sample_fn
from run_lib.training import train

# `main.py --mode=<name>`: each mode is a function (config, workdir, eval_folder).
MODES = {
    "train": lambda config, workdir, eval_folder: train(config, workdir),
    "eval": evaluate,
    "fid_stats": lambda config, workdir, eval_folder: fid_stats(config, workdir),
    "sample": sample,
    "inpaint": inpaint,
    "colorize": colorize,
    "train_classifier": train_classifier,
    "conditional": conditional,
    "likelihood": likelihood_mode,
    "import": import_checkpoint,
    "export": export,
    "data_stats": lambda config, workdir, eval_folder: data_stats(config, workdir),
    "encode": encode,
    "decode": decode,
    "interpolate": interpolate,
}

# What main.py turns into one line: bad input (exit code 2), and runs that cannot go on (1).
USAGE_ERRORS = (UsageError, datasets.DataError, FileNotFoundError,
                checkpoints.ConfigMismatchError, pretrained.PretrainedError)
RUN_ERRORS = (CheckpointError, FloatingPointError, DiskFullError, evaluation.WeightFileError,
              OSError)

__all__ = ["RUN_ERRORS", "USAGE_ERRORS", "CheckpointError", "ConfigError", "DiskFullError",
           "Interrupted", "MODES", "UsageError", "build_step_fns", "evaluate", "fid_stats",
           "get_sample_fn", "init_state", "interrupt", "logs", "make_mesh", "to_global", "train",
           "validate_config"]
