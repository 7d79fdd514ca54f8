"""The reference's `models.utils` names, and the train State.

The code lives by concern; this module keeps every name reference code and the tests call:
  models/registry.py     register_model, get_model, registered_models
  models/from_config.py  create_model, model_kwargs, get_sigmas (the one place that reads a
                         config for a network, with its consistency checks)
  models/init.py         init_model, InitializedModel, param_shapes, count_params,
                         get_model_fn, get_score_fn
  models/classifier.py   create_classifier_module, init_classifier_params,
                         load_classifier_params, create_classifier
  models/param_trees.py  first_difference: a checkpoint's names and shapes against the
                         expected ones

A score model is a flax.linen Module with typed fields (for example
`NCSNpp(nf=128, ch_mult=(1, 2, 2, 2), ...)`) applied as
`model.apply(variables, x [B, H, W, C], labels [B], train=bool)`.
"""

from __future__ import annotations

from typing import Any

import flax

from models.classifier import (
    create_classifier,
    create_classifier_module,
    init_classifier_params,
    load_classifier_params,
)
from models.from_config import create_model, get_sigmas, model_kwargs
from models.from_config import dummy_inputs as _dummy_inputs
from models.init import (
    InitializedModel,
    count_params,
    get_model_fn,
    get_score_fn,
    init_model,
    param_shapes,
)
from models.registry import _MODELS, get_model, register_model, registered_models


@flax.struct.dataclass
class State:
    """Everything a training run changes; constants stay in the config."""

    step: Any
    params: Any
    opt_state: Any
    params_ema: Any
    model_state: Any
    rng: Any


__all__ = ["InitializedModel", "State", "count_params", "create_classifier",
           "create_classifier_module", "create_model", "get_model", "get_model_fn",
           "get_score_fn", "get_sigmas", "init_classifier_params", "init_model",
           "load_classifier_params", "model_kwargs", "param_shapes", "register_model",
           "registered_models", "_MODELS", "_dummy_inputs"]
