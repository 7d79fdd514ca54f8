"""The modes of `main.py --mode=<name>`: the one list of them.

Each mode is a function `(config, workdir, eval_folder)` named here as "module:function" and
imported only when it runs, so that this module (and `main.py --help`, which lists the names)
needs no JAX or TensorFlow.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

MODES = {
    "train": "run_lib.training:train",
    "eval": "run_lib.evaluating:evaluate",
    "fid_stats": "run_lib.evaluating:fid_stats",
    "sample": "run_lib.generate:sample",
    "inpaint": "run_lib.controllable:inpaint",
    "colorize": "run_lib.controllable:colorize",
    "train_classifier": "run_lib.classifier:train_classifier",
    "conditional": "run_lib.guided:conditional",
    "likelihood": "run_lib.bits_per_dim:likelihood_mode",
    "import": "run_lib.interop:import_checkpoint",
    "export": "run_lib.exporting:export",
    "data_stats": "run_lib.data_statistics:data_stats",
    "encode": "run_lib.encoding:encode",
    "decode": "run_lib.decoding:decode",
    "interpolate": "run_lib.interpolation:interpolate",
}

NAMES = list(MODES)


def load(name: str) -> Callable[..., object]:
    """The function of mode `name`: called as `fn(config, workdir, eval_folder)`."""
    module, _, function = MODES[name].partition(":")
    return getattr(importlib.import_module(module), function)
