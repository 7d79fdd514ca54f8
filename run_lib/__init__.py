"""Training, evaluation and the other modes of `main.py`; owns devices, files and logs.

The library modules (sde_lib, losses, sampling, likelihood, controllable_generation,
evaluation) are pure JAX; everything they leave out lives here: the device mesh and sharding
(`devices`), checkpoints (`checkpoints`), files (`files`), logs and progress (`logs`), config
validation (`checks`), the build layer where a config becomes objects (`build`: SDE, score
model, network, optimizer, step functions, samplers, the bits/dim program), the one jit of a
function of (rng, params, model_state, batch...) on the mesh (`steps.program`), the one
training loop (`loop`, which the score model (`training`) and the classifier (`classifier`)
run as tasks), resumable batches of outputs (`batches`) and the modes (`modes`: the one list
of them). One code path serves one CPU, one GPU, several devices and several
hosts: the batch is sharded over a one-axis device mesh, the train state is replicated, and
each host reads its own shard of the data.

The names below are imported on first use (PEP 562 module `__getattr__`), so that
`import run_lib` and `run_lib.modes` (main.py's --help) need no JAX or TensorFlow.

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

import importlib
import importlib.util

from run_lib import modes

# Public names -> the module that defines them; the modes' functions come from run_lib.modes.
_EXPORTS = {
    "CheckpointError": "run_lib.checks", "ConfigError": "run_lib.checks",
    "UsageError": "run_lib.checks", "validate_config": "run_lib.checks",
    "DiskFullError": "run_lib.checkpoints", "init_state": "run_lib.checkpoints",
    "Interrupted": "run_lib.interrupt",
    "make_mesh": "run_lib.devices", "to_global": "run_lib.devices",
    "build_step_fns": "run_lib.steps", "get_sample_fn": "run_lib.steps",
    **{path.partition(":")[2]: path.partition(":")[0] for path in modes.MODES.values()},
}


def _errors() -> dict[str, tuple[type[BaseException], ...]]:
    """What main.py turns into one line: bad input (exit code 2), and runs that cannot go on
    (1)."""
    import datasets
    import evaluation
    import pretrained
    from run_lib import checkpoints, checks

    return {"USAGE_ERRORS": (checks.UsageError, datasets.DataError, FileNotFoundError,
                             checkpoints.ConfigMismatchError, pretrained.PretrainedError),
            "RUN_ERRORS": (checks.CheckpointError, FloatingPointError,
                           checkpoints.DiskFullError, evaluation.WeightFileError, OSError)}


def __getattr__(name: str):
    if name == "MODES":  # `main.py --mode=<name>`: a function (config, workdir, eval_folder)
        value = {mode: modes.load(mode) for mode in modes.NAMES}
    elif name in ("USAGE_ERRORS", "RUN_ERRORS"):
        value = _errors()[name]
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


__all__ = ["RUN_ERRORS", "USAGE_ERRORS", "CheckpointError", "ConfigError", "DiskFullError",
           "Interrupted", "MODES", "UsageError", "build_step_fns", "evaluate", "fid_stats",
           "get_sample_fn", "init_state", "interrupt", "logs", "make_mesh", "to_global", "train",
           "validate_config"]
