"""Validation of a config before anything is built or compiled, and the run's error types."""

from __future__ import annotations

import math
import os

import configs
import datasets
import fast_samplers
import losses
import ode
import sampling
import score_model
import sde_lib
from configs import plugins
from models import precision
from models import utils as mutils
from run_lib import inputs, runtime


class UsageError(ValueError):
    """Bad input from the user (flags, config, workdir, data): one line, exit code 2."""


class ConfigError(UsageError):
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


def _sde_class(config):
    """The registered SDE class config.training.sde names, or None."""
    try:
        return sde_lib.get_sde_class(config.training.sde)
    except ValueError:
        return None


def _check_names(config, problems):
    problems.check(_sde_class(config) is not None,
                   f"config.training.sde={config.training.sde!r}; valid: "
                   f"{sde_lib.registered_sdes()}")
    problems.call("config.model.name", mutils.get_model, config.model.name)
    try:  # the registry (datasets.register_dataset) is the only list of valid names
        spec = datasets.get_spec(config.data.dataset)
    except ValueError:
        spec = None
        problems.append(f"config.data.dataset={config.data.dataset!r}; valid: "
                        f"{datasets.valid_names()}")
    problems.check(spec is None or spec.channels is None
                   or config.data.num_channels == spec.channels,
                   f"config.data.num_channels={config.data.num_channels} but "
                   f"{config.data.dataset} has {spec and spec.channels} channel(s)")
    if spec is not None and spec.check is not None:
        problems.call(None, spec.check, config)
    problems.call("config.sampling.method", sampling.get_sampler, config.sampling.method)
    if config.sampling.method == "pc":
        problems.call("config.sampling.predictor", sampling.get_predictor,
                      config.sampling.predictor)
        problems.call("config.sampling.corrector", sampling.get_corrector,
                      config.sampling.corrector)
    problems.call("config.sampling.ode_method", ode.canonical_method, config.sampling.ode_method)
    problems.call("config.training.precision", precision.check_precision,
                  config.training.precision)
    if config.model.name in mutils.registered_models():
        problems.call(None, mutils.model_kwargs, config)
    if config.sampling.method in fast_samplers.DEFAULT_SCHEDULES:
        _check_few_step(config.sampling, problems)


def _check_few_step(sc, problems):
    """Settings of the few-step samplers (`fast_samplers.DEFAULT_SCHEDULES`: 'ddim',
    'dpm_solver', 'heun', 'sde_dpm_solver', 'unipc', 'ipndm')."""
    problems.check(isinstance(sc.num_steps, int) and sc.num_steps >= 1,
                   f"config.sampling.num_steps={sc.num_steps!r} must be an integer >= 1")
    if sc.schedule != "default":
        problems.call("config.sampling.schedule", fast_samplers.check_schedule, sc.schedule)
    problems.check(sc.rho > 0, f"config.sampling.rho={sc.rho} must be > 0")
    problems.call("config.sampling.thresholding", fast_samplers.check_thresholding,
                  sc.thresholding, sc.threshold_percentile)
    if sc.method in fast_samplers.ORDERS:  # the multistep samplers
        orders = fast_samplers.ORDERS[sc.method]
        problems.check(not isinstance(sc.order, bool) and sc.order in orders,
                       f"config.sampling.order={sc.order!r}; valid: {list(orders)} for "
                       f"method {sc.method!r}")
    if sc.method == "unipc":
        problems.check(sc.unipc_variant in fast_samplers.UNIPC_VARIANTS,
                       f"config.sampling.unipc_variant={sc.unipc_variant!r}; valid: "
                       f"{list(fast_samplers.UNIPC_VARIANTS)}")
    if sc.method == "ddim":
        problems.check(0 <= sc.eta <= 1, f"config.sampling.eta={sc.eta} must lie in [0, 1]")
    if sc.method == "heun":
        problems.check(sc.churn >= 0, f"config.sampling.churn={sc.churn} must be >= 0")


def _check_schedule(config, problems):
    """Noise schedules and sampler settings that would give NaN or meaningless samples."""
    m, sc, sde = config.model, config.sampling, _sde_class(config)
    problems.check(m.num_scales >= 1, f"config.model.num_scales={m.num_scales} must be >= 1")
    # The built-in schedules' ranges (a registered SDE of another family is checked by its
    # own constructor, when validate_config builds it).
    if sde is not None and issubclass(sde, sde_lib.VESDE):
        problems.check(0 < m.sigma_min < m.sigma_max,
                       f"config.model.sigma_min={m.sigma_min} and sigma_max={m.sigma_max} must "
                       "satisfy 0 < sigma_min < sigma_max")
    elif sde is not None and issubclass(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):
        problems.check(0 < m.beta_min < m.beta_max,
                       f"config.model.beta_min={m.beta_min} and beta_max={m.beta_max} must "
                       "satisfy 0 < beta_min < beta_max")
        # The discrete chain's betas are linspace(beta_min / N, beta_max / N, N) (DDPM).
        problems.check(m.num_scales < 1 or m.beta_max / m.num_scales < 1,
                       f"config.model.beta_max / num_scales = {m.beta_max}/{m.num_scales} must "
                       "be < 1 (the largest discrete beta); raise num_scales")
    problems.check(sc.n_steps_each >= 0,
                   f"config.sampling.n_steps_each={sc.n_steps_each} must be >= 0")
    if sc.method == "pc" and sc.corrector not in ("none", None):
        problems.check(sc.snr > 0, f"config.sampling.snr={sc.snr} must be > 0")


def _check_network(config, problems):
    """The network builds for the config's image size (e.g. divisible by its downsampling)."""
    try:
        mutils.param_shapes(config)
    except (ValueError, TypeError) as e:
        problems.append(f"config.model ({config.model.name}) does not fit "
                        f"config.data.image_size={config.data.image_size}, num_channels="
                        f"{config.data.num_channels}: {e}")


def _check_decay(problems, section, name: str, iters_name: str, n_iters: int):
    """The learning-rate decay of config.<name> (losses.adam), which ends at n_iters."""
    decay = section.get("lr_decay", "none")
    problems.check(decay in losses.LR_DECAYS,
                   f"config.{name}.lr_decay={decay!r}; valid: {list(losses.LR_DECAYS)}")
    problems.check(decay != "cosine" or n_iters > section.warmup,
                   f"config.{name}.lr_decay='cosine' ends at {iters_name}.n_iters={n_iters}, "
                   f"which must exceed {name}.warmup={section.warmup}")


def _check_training(config, problems):
    tc = config.training
    if not tc.continuous:
        sde = _sde_class(config)
        discrete = [name for name in sde_lib.registered_sdes()
                    if sde_lib.get_sde_class(name).discrete_objective is not None]
        problems.check(sde is None or sde.discrete_objective is not None,
                       f"config.training.continuous=False needs an SDE with a discrete "
                       f"objective, training.sde one of {discrete}, got {tc.sde!r}")
        problems.check(not tc.likelihood_weighting,
                       "config.training.likelihood_weighting=True needs continuous=True")
    _check_decay(problems, config.optim, "optim", "training", tc.n_iters)
    m = config.model
    param = m.get("parameterization", "eps")
    problems.check(param in score_model.PARAMETERIZATIONS,
                   f"config.model.parameterization={param!r}; valid: "
                   f"{list(score_model.PARAMETERIZATIONS)}")
    dist = tc.get("time_distribution", "uniform")
    problems.check(dist in losses.TIME_DISTRIBUTIONS,
                   f"config.training.time_distribution={dist!r}; valid: "
                   f"{list(losses.TIME_DISTRIBUTIONS)}")
    if param == "edm":
        problems.check(tc.continuous, "config.model.parameterization='edm' needs "
                       "config.training.continuous=True")
        problems.check(float(m.get("sigma_data", 0.5)) > 0,
                       f"config.model.sigma_data={m.get('sigma_data')} must be > 0")
        problems.check(not m.get("scale_by_sigma", False),
                       "config.model.parameterization='edm' preconditions the network itself: "
                       "set config.model.scale_by_sigma=False")
    if dist != "uniform":
        problems.check(tc.continuous, f"config.training.time_distribution={dist!r} needs "
                       "config.training.continuous=True")
        problems.check(float(tc.get("p_std", 1.2)) > 0,
                       f"config.training.p_std={tc.get('p_std')} must be > 0")
    k = tc.n_jitted_steps
    problems.check(k >= 1, f"config.training.n_jitted_steps={k} must be >= 1")
    for key in ("snapshot_freq", "snapshot_freq_for_preemption", "log_freq", "eval_freq"):
        value = tc[key]
        problems.check(value > 0 and value % max(k, 1) == 0,
                       f"config.training.{key}={value} must be a positive multiple of "
                       f"training.n_jitted_steps={k}")


# Modes that load a checkpoint and generate (run_lib.generate, run_lib.controllable).
GENERATION_MODES = ("sample", "inpaint", "colorize", "conditional", "likelihood", "encode",
                    "decode", "interpolate")
# read images from config.controllable.source
_INPUT_MODES = ("inpaint", "colorize", "likelihood", "encode", "interpolate")
_PC_MODES = ("inpaint", "colorize")  # always the PC sampler of config.sampling


def _check_generation(config, mode, problems):
    """config.sample and config.controllable for the generating modes."""
    s, c = config.sample, config.controllable
    problems.check(s.ckpt >= 0, f"config.sample.ckpt={s.ckpt} must be >= 0 (0 = the newest)")
    problems.check(s.num_samples >= 1, f"config.sample.num_samples={s.num_samples} must be >= 1")
    if mode in _PC_MODES and config.sampling.method != "pc":  # else _check_names did it
        problems.call("config.sampling.predictor", sampling.get_predictor,
                      config.sampling.predictor)
        problems.call("config.sampling.corrector", sampling.get_corrector,
                      config.sampling.corrector)
    if mode in _INPUT_MODES:
        problems.check(c.num_inputs >= (1 if c.source in inputs.SPLITS else 0),
                       f"config.controllable.num_inputs={c.num_inputs} must be >= 1 (or 0 = all "
                       "images of a folder or .npz)")
    if mode in ("inpaint", "colorize"):
        problems.check(c.samples_per_input >= 1, "config.controllable.samples_per_input="
                                                 f"{c.samples_per_input} must be >= 1")
    if mode == "inpaint":
        problems.call(None, inputs.check_mask_settings, config)
    if mode == "colorize":
        problems.check(config.data.num_channels == 3,
                       f"--mode=colorize needs a 3-channel (colour) model, but "
                       f"config.data.num_channels={config.data.num_channels} "
                       f"({config.data.dataset}): there are no colours to fill in")
    if mode == "conditional":
        problems.call(None, inputs.parse_labels, c.labels, config.classifier.num_classes)
        problems.check(math.isfinite(c.scale), f"config.controllable.scale={c.scale} must be "
                                               "finite")
    if mode in ("decode", "interpolate"):
        problems.check(math.isfinite(c.temperature) and c.temperature > 0,
                       f"config.controllable.temperature={c.temperature} must be finite and > 0")
    if mode == "likelihood":
        problems.check(config.eval.bpd_num_repeats >= 1,
                       f"config.eval.bpd_num_repeats={config.eval.bpd_num_repeats} must be >= 1")


def _check_classifier(config, problems):
    c = config.classifier
    for key in ("n_iters", "snapshot_freq", "log_freq", "eval_freq", "batch_size",
                "eval_batches", "num_classes", "blocks_per_group", "channel_multiplier"):
        problems.check(c[key] >= 1, f"config.classifier.{key}={c[key]} must be >= 1")
    problems.check(c.lr > 0, f"config.classifier.lr={c.lr} must be > 0")
    _check_decay(problems, c, "classifier", "classifier", c.n_iters)
    smoothing = c.get("label_smoothing", 0.0)
    problems.check(0.0 <= smoothing < 1.0,
                   f"config.classifier.label_smoothing={smoothing} must lie in [0, 1)")
    problems.check(all(0.0 <= t <= 1.0 for t in c.eval_times),
                   f"config.classifier.eval_times={tuple(c.eval_times)} must lie in [0, 1]")
    normalizations = ("none", "cifar10")
    problems.check(c.input_normalization in normalizations,
                   f"config.classifier.input_normalization={c.input_normalization!r}; valid: "
                   f"{list(normalizations)}")


def load_plugins(config) -> None:
    """Imports config.plugins (configs.plugins.load); ConfigError naming a bad one."""
    try:
        plugins.load(config.get("plugins", ""))
    except plugins.PluginError as e:
        raise ConfigError(str(e)) from None


def prepare(config, mode: str, workdir: str | None = None):
    """The config a mode runs with: completed with this project's defaults for keys a
    reference-format config lacks (`configs.complete`), then validated. With a `workdir`, an
    empty config.data.cache_dir becomes `<workdir>/data_cache` (the 'folder' data set's
    decoded images)."""
    load_plugins(config)
    config = configs.complete(config)
    config.plugins = plugins.normalize(config.plugins)  # absolute paths in config.json
    validate_config(config, mode)
    if workdir and not config.data.cache_dir:
        config.data.cache_dir = os.path.join(workdir, "data_cache")
    # Before anything compiles: later runs of the same programs load them from the cache.
    runtime.setup_compile_cache(config.training.compile_cache_dir)
    return config


def validate_config(config, mode: str = "train") -> None:
    """Raises ConfigError naming every bad value and its valid choices.

    Accepts configs in the reference's format: absent keys take this project's defaults.
    Imports config.plugins first: their SDEs, samplers and networks are valid names.
    """
    load_plugins(config)
    config = configs.complete(config)
    problems = _Problems()
    _check_names(config, problems)
    _check_schedule(config, problems)
    batches = [("eval.batch_size", config.eval.batch_size)]
    if mode == "train":
        batches.append(("training.batch_size", config.training.batch_size))
        _check_training(config, problems)
    if mode == "train_classifier":
        batches.append(("classifier.batch_size", config.classifier.batch_size))
    if mode in ("train_classifier", "conditional"):
        _check_classifier(config, problems)
    if mode in GENERATION_MODES:
        _check_generation(config, mode, problems)
    for key, value in batches:
        problems.call(None, datasets.check_batch_size, key, value)
    if mode == "eval":
        ec = config.eval
        problems.check(ec.bpd_dataset in ("train", "test"),
                       f"config.eval.bpd_dataset={ec.bpd_dataset!r}; valid: ['train', 'test']")
        problems.check(ec.begin_ckpt <= ec.end_ckpt,
                       f"config.eval.begin_ckpt={ec.begin_ckpt} > end_ckpt={ec.end_ckpt}")
    if not problems:  # building is only meaningful for an otherwise valid config
        problems.call("config.training.sde", sde_lib.get_sde, config)
        _check_network(config, problems)
    if problems:
        raise ConfigError("Invalid config: " + problems[0] if len(problems) == 1 else
                          "Invalid config:\n  " + "\n  ".join(problems))
