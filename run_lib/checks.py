"""Validation of a config before anything is built or compiled, and the run's error types."""

from __future__ import annotations

import datasets
import ode
import sampling
from models import utils as mutils

SDE_NAMES = ("vesde", "vpsde", "subvpsde")


class ConfigError(ValueError):
    """A config value that cannot work; the message names it and the valid choices."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored; the files are left as they are."""


class _Problems(list):
    """Collects every problem of a config, so one run reports all of them at once."""

    def check(self, ok, message):
        if not ok:
            self.append(message)

    def call(self, prefix, fn, *args):
        """Runs a check that raises ValueError; records its message (after `prefix`, if any)."""
        try:
            fn(*args)
        except ValueError as e:
            self.append(f"{prefix}: {e}" if prefix else str(e))


def _check_names(config, problems):
    problems.check(config.training.sde.lower() in SDE_NAMES,
                   f"config.training.sde={config.training.sde!r}; valid: {list(SDE_NAMES)}")
    problems.call("config.model.name", mutils.get_model, config.model.name)
    problems.check(config.data.dataset in datasets.DATASETS,
                   f"config.data.dataset={config.data.dataset!r}; valid: "
                   f"{sorted(datasets.DATASETS)}")
    problems.call("config.sampling.method", sampling.get_sampler, config.sampling.method)
    if config.sampling.method == "pc":
        problems.call("config.sampling.predictor", sampling.get_predictor,
                      config.sampling.predictor)
        problems.call("config.sampling.corrector", sampling.get_corrector,
                      config.sampling.corrector)
    problems.call("config.sampling.ode_method", ode.canonical_method, config.sampling.ode_method)


def _check_training(config, problems):
    tc = config.training
    if not tc.continuous:
        problems.check(tc.sde.lower() in ("vesde", "vpsde") or tc.sde.lower() not in SDE_NAMES,
                       f"config.training.continuous=False needs training.sde 'vesde' or "
                       f"'vpsde', got {tc.sde!r}")
        problems.check(not tc.likelihood_weighting,
                       "config.training.likelihood_weighting=True needs continuous=True")
    k = tc.n_jitted_steps
    problems.check(k >= 1, f"config.training.n_jitted_steps={k} must be >= 1")
    for key in ("snapshot_freq", "snapshot_freq_for_preemption", "log_freq", "eval_freq"):
        value = tc[key]
        problems.check(value > 0 and value % max(k, 1) == 0,
                       f"config.training.{key}={value} must be a positive multiple of "
                       f"training.n_jitted_steps={k}")


def validate_config(config, mode: str = "train") -> None:
    """Raises ConfigError naming every bad value and its valid choices."""
    problems = _Problems()
    _check_names(config, problems)
    batches = [("eval.batch_size", config.eval.batch_size)]
    if mode == "train":
        batches.append(("training.batch_size", config.training.batch_size))
        _check_training(config, problems)
    for key, value in batches:
        problems.call(None, datasets.check_batch_size, key, value)
    if mode == "eval":
        ec = config.eval
        problems.check(ec.bpd_dataset in ("train", "test"),
                       f"config.eval.bpd_dataset={ec.bpd_dataset!r}; valid: ['train', 'test']")
        problems.check(ec.begin_ckpt <= ec.end_ckpt,
                       f"config.eval.begin_ckpt={ec.begin_ckpt} > end_ckpt={ec.end_ckpt}")
    if problems:
        raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))
