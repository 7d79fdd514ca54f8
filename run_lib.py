"""Training, evaluation and dataset-statistics loops.

This module owns everything the library modules leave out: devices and sharding, files,
checkpoints, logging and progress. One code path serves one CPU, one GPU, several devices
and several hosts: the batch is sharded over a one-axis device mesh, the train state is
replicated, and each host reads its own shard of the data.

Workdir layout:
  config.json                      the resolved config of the run
  checkpoints/checkpoint_<k>       Orbax checkpoint every snapshot_freq steps (k = step / freq)
  checkpoints-meta/<step>          latest state, for preemption (plus the input-pipeline state)
  samples/iter_<step>/sample.png   snapshot sample grid (and sample.npz)
  tensorboard/                     scalars
  <eval_folder>/                   evaluation outputs and summary.json
"""

from __future__ import annotations

import glob
import json
import math
import os
import time

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import datasets
import losses
import sampling
import sde_lib
from models import utils as mutils

# ----------------------------------------------------------------------------------------
# Validation: every name and size is checked before anything is built or compiled.


class ConfigError(ValueError):
    """A config value that cannot work; the message names it and the valid choices."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored; the files are left as they are."""


def validate_config(config, mode: str = "train") -> None:
    """Raises ConfigError naming every bad value and its valid choices."""
    errors = []

    def check(ok, message):
        if not ok:
            errors.append(message)

    sde_names = ("vesde", "vpsde", "subvpsde")
    check(config.training.sde.lower() in sde_names,
          f"config.training.sde={config.training.sde!r}; valid: {list(sde_names)}")
    try:
        mutils.get_model(config.model.name)
    except ValueError as e:
        errors.append(f"config.model.name: {e}")
    check(config.data.dataset in datasets.DATASETS,
          f"config.data.dataset={config.data.dataset!r}; valid: {sorted(datasets.DATASETS)}")
    check(config.sampling.method in ("pc", "ode"),
          f"config.sampling.method={config.sampling.method!r}; valid: ['pc', 'ode']")
    if config.sampling.method == "pc":
        for kind, getter in (("predictor", sampling.get_predictor),
                             ("corrector", sampling.get_corrector)):
            try:
                getter(getattr(config.sampling, kind))
            except ValueError as e:
                errors.append(f"config.sampling.{kind}: {e}")
    try:
        sampling.check_ode_method(config.sampling.ode_method)
    except ValueError as e:
        errors.append(f"config.sampling.ode_method: {e}")
    if not config.training.continuous:
        objective = {"vesde": "smld", "vpsde": "ddpm"}.get(config.training.sde.lower())
        check(objective is not None or config.training.sde.lower() not in sde_names,
              f"config.training.continuous=False needs training.sde 'vesde' or 'vpsde', got "
              f"{config.training.sde!r}")
        check(not config.training.likelihood_weighting,
              "config.training.likelihood_weighting=True needs continuous=True")
    n_dev, n_proc = jax.device_count(), jax.process_count()
    batches = [("eval.batch_size", config.eval.batch_size)]
    if mode == "train":
        batches.append(("training.batch_size", config.training.batch_size))
    for key, value in batches:
        check(value > 0 and value % n_dev == 0 and value % n_proc == 0,
              f"config.{key}={value} must be a positive multiple of the device count "
              f"{n_dev} (and of the process count {n_proc})")
    if mode == "train":
        k = config.training.n_jitted_steps
        check(k >= 1, f"config.training.n_jitted_steps={k} must be >= 1")
        for key in ("snapshot_freq", "snapshot_freq_for_preemption", "log_freq", "eval_freq"):
            value = getattr(config.training, key)
            check(value > 0 and value % k == 0,
                  f"config.training.{key}={value} must be a positive multiple of "
                  f"training.n_jitted_steps={k}")
    if mode == "eval":
        check(config.eval.bpd_dataset in ("train", "test"),
              f"config.eval.bpd_dataset={config.eval.bpd_dataset!r}; valid: ['train', 'test']")
        check(config.eval.begin_ckpt <= config.eval.end_ckpt,
              f"config.eval.begin_ckpt={config.eval.begin_ckpt} > end_ckpt="
              f"{config.eval.end_ckpt}")
    if errors:
        raise ConfigError("Invalid config:\n  " + "\n  ".join(errors))


# ----------------------------------------------------------------------------------------
# Devices, sharding and files


def make_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


def _to_global(local, sharding):
    """Assembles per-host arrays into one global array sharded along the batch axis."""
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)


def _gather(x) -> np.ndarray:
    """A (possibly multi-host) global array as one numpy array on every host."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _atomic_savez(path, **arrays):
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def _atomic_write_text(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save_config(config, workdir):
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        _atomic_write_text(os.path.join(workdir, "config.json"),
                           config.to_json_best_effort(indent=2, sort_keys=True))


def to_uint8(images) -> np.ndarray:
    return np.clip(np.round(np.asarray(images) * 255.0), 0, 255).astype(np.uint8)


def save_image_grid(images_uint8, path):
    """Writes [N, H, W, C] uint8 images as a roughly square PNG grid."""
    from PIL import Image

    n, h, w, c = images_uint8.shape
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    pad = 2
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[y:y + h, x:x + w] = images_uint8[i]
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


class _Throughput:
    """Steps/s and ETA from wall-clock time between log points."""

    def __init__(self, step, total):
        self.t0, self.step0, self.total = time.time(), step, total

    def __call__(self, step):
        now = time.time()
        rate = (step - self.step0) / max(now - self.t0, 1e-9)
        self.t0, self.step0 = now, step
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        return rate, eta


def _fmt_eta(seconds):
    if not np.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


# ----------------------------------------------------------------------------------------
# Checkpoints


def _checkpoint_managers(workdir, config):
    import orbax.checkpoint as ocp

    workdir = os.path.abspath(workdir)
    keep = int(getattr(config.training, "max_ckpts_to_keep", 0)) or None
    snapshots = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             step_prefix="checkpoint",
                                             enable_async_checkpointing=False))
    meta = ocp.CheckpointManager(
        os.path.join(workdir, "checkpoints-meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                             enable_async_checkpointing=False))
    return snapshots, meta


# Initialization runs once: optimizing its XLA program costs more time than it saves
# (30 s -> 7 s to compile the tiny test model's init on one CPU core).
_RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                              "xla_llvm_disable_expensive_passes": True}


def init_state(config, rng, sharding):
    """The initial train State, created directly with the given (replicated) sharding."""
    init_fn = _state_init_fn(config)
    on_cpu = jax.devices()[0].platform == "cpu"
    compiled = jax.jit(init_fn, out_shardings=sharding).lower(rng).compile(
        _RUN_ONCE_COMPILER_OPTIONS if on_cpu else None)
    return compiled(rng)


def _state_init_fn(config):
    return lambda key: losses.init_train_state(key, config)[1]


def _abstract_state(config, rng, sharding):
    """Shapes, dtypes and shardings of the train State, without allocating it."""
    shapes = jax.eval_shape(_state_init_fn(config), rng)
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


def _restore(manager, step, abstract):
    import orbax.checkpoint as ocp

    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # a truncated or foreign checkpoint: say which and stop
        raise CheckpointError(
            f"Could not restore checkpoint {step} from {manager.directory}: {e}. The files "
            "are left untouched; move the damaged checkpoint away to resume from an older "
            "one.") from e


def _save(manager, step, state):
    import orbax.checkpoint as ocp

    manager.save(step, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()


def _data_state_prefix(workdir, step):
    return os.path.join(os.path.abspath(workdir), "checkpoints-meta", "data",
                        f"process_{jax.process_index()}", f"step_{step}")


def _save_data_state(workdir, step, iterator):
    """Saves this host's input-pipeline position so a resumed run reads the same batches."""
    import tensorflow as tf

    prefix = _data_state_prefix(workdir, step)
    tf.train.Checkpoint(iterator=iterator).write(prefix)
    # keep the two newest pipeline states (the meta checkpoint keeps one)
    folder = os.path.dirname(prefix)
    steps = sorted({int(os.path.basename(p).split(".")[0][5:])
                    for p in glob.glob(os.path.join(folder, "step_*"))})
    for old in steps[:-2]:
        for f in glob.glob(os.path.join(folder, f"step_{old}.*")):
            os.remove(f)


def _restore_data_state(workdir, step, iterator) -> bool:
    import tensorflow as tf

    prefix = _data_state_prefix(workdir, step)
    if not os.path.exists(prefix + ".index"):
        return False
    tf.train.Checkpoint(iterator=iterator).read(prefix).assert_consumed()
    return True


# ----------------------------------------------------------------------------------------
# Score functions, steps and samplers


def _build(config):
    sde = sde_lib.get_sde(config)
    model = mutils.create_model(config)
    return sde, model


def get_sample_fn(config, sde, model, shape, mesh):
    """Returns sample(rng, params, model_state) -> (uint8-ready images in [0, 1], nfe)."""
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    sampler = sampling.get_sampling_fn(config, sde, shape, inverse_scaler, sde.sampling_eps)
    continuous = config.training.continuous

    def sample(rng, params, model_state):
        score_fn = mutils.get_score_fn(sde, model, params, model_state, train=False,
                                       continuous=continuous)
        return sampler(rng, score_fn)

    ode_method = str(getattr(config.sampling, "ode_method", "dopri5")).lower()
    if config.sampling.method == "ode" and ode_method.startswith("scipy"):
        return sample  # host-side solver: not jittable
    batch_sharding = NamedSharding(mesh, P("data"))
    return jax.jit(sample, out_shardings=(batch_sharding, NamedSharding(mesh, P())))


# ----------------------------------------------------------------------------------------
# Training


def build_step_fns(config, sde, model, optimizer, mesh):
    """The jitted, sharded train step and eval-loss function on `mesh`.

    train_step(state, batch [n, B, H, W, C]) -> (state, losses [n]) with the state replicated
    and donated, the batch split over the mesh; eval_losses(state, batch) -> losses [n].
    Without an optimizer only eval_losses is built (train_step is None).
    """
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    tc = config.training
    kwargs = dict(reduce_mean=tc.reduce_mean, continuous=tc.continuous,
                  likelihood_weighting=tc.likelihood_weighting)
    train_step = None if optimizer is None else jax.jit(
        losses.get_step_fn(sde, model, train=True, optimizer=optimizer,
                           ema_rate=config.model.ema_rate, **kwargs),
        in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
        donate_argnums=0)
    eval_step = losses.get_step_fn(sde, model, train=False, **kwargs)
    eval_losses = jax.jit(lambda state, batch: eval_step(state, batch)[1],
                          in_shardings=(replicated, batch_sharding), out_shardings=replicated)
    return train_step, eval_losses


def train(config, workdir: str) -> None:
    """Trains the configured score model, resuming from workdir/checkpoints-meta if present."""
    validate_config(config, "train")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    save_config(config, workdir)
    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P(None, "data"))
    is_chief = jax.process_index() == 0

    sde, model = _build(config)
    optimizer = losses.get_optimizer(config)
    rng = jax.random.PRNGKey(config.seed)
    snapshots, meta = _checkpoint_managers(workdir, config)

    train_ds, eval_ds, _ = datasets.get_dataset(
        config, uniform_dequantization=config.data.uniform_dequantization)
    train_iter, eval_iter = iter(train_ds), iter(eval_ds)
    scaler = datasets.get_data_scaler(config)

    latest = meta.latest_step()
    if latest is not None:
        state = _restore(meta, latest, _abstract_state(config, rng, replicated))
        if not _restore_data_state(workdir, latest, train_iter):
            logging.warning("No input-pipeline state for step %d: the data order restarts.",
                            latest)
        logging.info("Resumed from %s at step %d.", meta.directory, latest)
    else:
        state = init_state(config, rng, replicated)
    logging.info("Model %s: %s parameters.", config.model.name,
                 f"{mutils.count_params(state.params):,}")

    tc = config.training
    train_step, eval_losses = build_step_fns(config, sde, model, optimizer, mesh)
    sample_fn = None
    if tc.snapshot_sampling:
        shape = (tc.batch_size, config.data.image_size, config.data.image_size,
                 config.data.num_channels)
        sample_fn = get_sample_fn(config, sde, model, shape, mesh)

    writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard")) \
        if is_chief else None

    def log_scalar(name, value, step):
        if writer is not None:
            with writer.as_default():
                tf.summary.scalar(name, value, step=step)

    def next_batch(iterator):
        images = scaler(iterator.get_next()["image"].numpy())
        return _to_global(images, batch_sharding)

    step = int(state.step)
    total = tc.n_iters
    throughput = _Throughput(step, total)
    k = tc.n_jitted_steps
    if step >= total:
        logging.info("Already trained to step %d >= n_iters=%d; nothing to do.", step, total)
    while step < total:
        state, step_losses = train_step(state, next_batch(train_iter))
        step += k
        at_end = step >= total
        snapshot = step % tc.snapshot_freq == 0 or at_end
        save = snapshot or step % tc.snapshot_freq_for_preemption == 0
        log = step % tc.log_freq == 0 or at_end
        if log or save:
            # Only here does the host wait for the device; a NaN in the parameters shows in
            # the loss, so checking before every save keeps non-finite states off disk.
            step_losses = np.asarray(jax.device_get(step_losses))
            if not np.all(np.isfinite(step_losses)):
                raise FloatingPointError(
                    f"Non-finite training loss {step_losses} at step {step}; stopping before "
                    f"any checkpoint is written. The last good state is in "
                    f"{meta.directory} (step {meta.latest_step()}).")
        if log:
            rate, eta = throughput(step)
            logging.info("step %d/%d  loss %.5f  %.2f steps/s  %.1f img/s  ETA %s", step, total,
                         float(step_losses[-1]), rate, rate * tc.batch_size, _fmt_eta(eta))
            log_scalar("training_loss", float(step_losses[-1]), step)
            log_scalar("steps_per_second", rate, step)
        if step % tc.eval_freq == 0:
            eval_loss = float(np.asarray(eval_losses(state, next_batch(eval_iter)))[-1])
            logging.info("step %d  eval_loss %.5f", step, eval_loss)
            log_scalar("eval_loss", eval_loss, step)
        if save:
            # Pipeline state first: a meta checkpoint is only ever paired with its own data.
            _save_data_state(workdir, step, train_iter)
            _save(meta, step, state)
        if snapshot:
            _save(snapshots, step // tc.snapshot_freq, state)
            if sample_fn is not None:
                _snapshot_samples(sample_fn, state, step, workdir, is_chief)
    if writer is not None:
        writer.flush()
    logging.info("Training finished at step %d.", step)


def _snapshot_samples(sample_fn, state, step, workdir, is_chief):
    rng = jax.random.fold_in(jax.random.fold_in(state.rng, 0x5A3F), step)
    t0 = time.time()
    samples, nfe = sample_fn(rng, state.params_ema, state.model_state)
    samples = to_uint8(_gather(samples))
    logging.info("step %d: %d samples, %d NFE, %.1fs", step, len(samples), int(nfe),
                 time.time() - t0)
    if is_chief:
        folder = os.path.join(workdir, "samples", f"iter_{step}")
        os.makedirs(folder, exist_ok=True)
        _atomic_savez(os.path.join(folder, "sample.npz"), samples=samples)
        save_image_grid(samples, os.path.join(folder, "sample.png"))


# ----------------------------------------------------------------------------------------
# Evaluation


def _progress(iterable, total, desc, config):
    if not (config.eval.show_progress and jax.process_index() == 0):
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True)


def _inception(config):
    """The Inception feature function, loaded before anything is compiled."""
    import evaluation

    return evaluation.get_inception_model(config.eval.inception_weights or None)


def _features(inception_fn, images_uint8) -> dict:
    if images_uint8.shape[-1] == 1:  # grayscale data sets: Inception wants RGB
        images_uint8 = np.repeat(images_uint8, 3, axis=-1)
    out = inception_fn(images_uint8)
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


def _wait_for_checkpoint(manager, ckpt, config):
    waited, poll = 0.0, min(60.0, max(1.0, float(config.eval.ckpt_wait_secs) / 10))
    while ckpt not in manager.all_steps(read=True):
        if waited >= config.eval.ckpt_wait_secs:
            raise FileNotFoundError(
                f"Checkpoint {ckpt} did not appear in {manager.directory} within "
                f"{config.eval.ckpt_wait_secs} s (config.eval.ckpt_wait_secs); existing: "
                f"{list(manager.all_steps(read=True))}.")
        logging.info("Waiting for checkpoint %d in %s ...", ckpt, manager.directory)
        time.sleep(poll)
        waited += poll


def _update_summary(eval_dir, ckpt, results):
    path = os.path.join(eval_dir, "summary.json")
    summary = {}
    if os.path.exists(path):
        with open(path) as f:
            summary = json.load(f)
    summary.setdefault(str(ckpt), {}).update(results)
    _atomic_write_text(path, json.dumps(summary, indent=2, sort_keys=True))


def evaluate(config, workdir: str, eval_folder: str = "eval") -> None:
    """Evaluates checkpoints begin_ckpt..end_ckpt: loss, bits/dim and sample quality.

    Writes under workdir/<eval_folder>/: ckpt_<k>_loss.npz, ckpt_<k>_bpd.npz,
    ckpt_<k>/samples_<r>.npz and statistics_<r>.npz per sampling round, report_<k>.npz
    (IS, FID, KID) and summary.json. A killed evaluation resumes at its next unfinished
    sampling round and reproduces the uninterrupted result exactly.
    """
    validate_config(config, "eval")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    ec = config.eval
    eval_dir = os.path.join(workdir, eval_folder)
    os.makedirs(eval_dir, exist_ok=True)
    mesh = make_mesh()
    replicated = NamedSharding(mesh, P())
    batch_sharding = NamedSharding(mesh, P("data"))
    is_chief = jax.process_index() == 0

    # Everything that can fail on bad input happens before the first compile.
    inception_fn = data_pool = None
    if ec.enable_sampling:
        import evaluation

        data_pool = evaluation.load_dataset_stats(config)["pool_3"]
        inception_fn = _inception(config)
    sde, model = _build(config)
    scaler = datasets.get_data_scaler(config)
    inverse_scaler = datasets.get_data_inverse_scaler(config)
    continuous = config.training.continuous
    rng = jax.random.PRNGKey(config.seed)
    abstract = _abstract_state(config, rng, replicated)
    snapshots, _ = _checkpoint_managers(workdir, config)

    if ec.enable_loss:
        _, loss_ds, _ = datasets.get_dataset(
            config, uniform_dequantization=config.data.uniform_dequantization, evaluation=True)
        _, eval_losses = build_step_fns(config, sde, model, None, mesh)
        stacked_sharding = NamedSharding(mesh, P(None, "data"))
    if ec.enable_bpd:
        import likelihood

        train_bpd, test_bpd, _ = datasets.get_dataset(config, uniform_dequantization=True,
                                                      evaluation=True)
        bpd_ds = train_bpd if ec.bpd_dataset == "train" else test_bpd
        bpd_repeats = 1 if ec.bpd_dataset == "train" else int(ec.bpd_num_repeats)
        likelihood_fn = likelihood.get_likelihood_fn(
            sde, inverse_scaler, rtol=config.sampling.ode_rtol, atol=config.sampling.ode_atol,
            method=config.sampling.ode_method)

        def bpd_fn(rng, params, model_state, x):
            score_fn = mutils.get_score_fn(sde, model, params, model_state, train=False,
                                           continuous=continuous)
            bpd, _, nfe = likelihood_fn(rng, score_fn, x)
            return bpd, nfe

        if not str(config.sampling.ode_method).lower().startswith("scipy"):
            bpd_fn = jax.jit(bpd_fn, in_shardings=(replicated, replicated, replicated,
                                                   batch_sharding),
                             out_shardings=(batch_sharding, replicated))
    if ec.enable_sampling:
        num_samples = ec.fast_fid_num_samples if ec.fast_fid else ec.num_samples
        num_rounds = int(math.ceil(num_samples / ec.batch_size))
        shape = (ec.batch_size, config.data.image_size, config.data.image_size,
                 config.data.num_channels)
        sample_fn = get_sample_fn(config, sde, model, shape, mesh)

    for ckpt in range(ec.begin_ckpt, ec.end_ckpt + 1):
        _wait_for_checkpoint(snapshots, ckpt, config)
        state = _restore(snapshots, ckpt, abstract)
        results = {"step": int(state.step)}
        ckpt_rng = jax.random.fold_in(rng, ckpt)

        if ec.enable_loss:
            values = []
            for batch in _progress(loss_ds, None, f"ckpt {ckpt} loss", config):
                x = _to_global(scaler(batch["image"].numpy())[None], stacked_sharding)
                values.append(float(eval_losses(state, x)[0]))
            results["loss"] = float(np.mean(values))
            if is_chief:
                _atomic_savez(os.path.join(eval_dir, f"ckpt_{ckpt}_loss.npz"),
                              all_losses=np.asarray(values), mean_loss=results["loss"])
            logging.info("ckpt %d: eval loss %.5f", ckpt, results["loss"])

        if ec.enable_bpd:
            bpds = []
            for repeat in range(bpd_repeats):
                batches = bpd_ds.take(ec.num_bpd_batches) if ec.num_bpd_batches > 0 else bpd_ds
                desc = f"ckpt {ckpt} bits/dim pass {repeat + 1}/{bpd_repeats}"
                for i, batch in enumerate(_progress(batches, None, desc, config)):
                    x = _to_global(scaler(batch["image"].numpy()), batch_sharding)
                    key = jax.random.fold_in(jax.random.fold_in(ckpt_rng, repeat), i)
                    bpd, _ = bpd_fn(key, state.params_ema, state.model_state, x)
                    bpds.append(_gather(bpd))
            bpds = np.concatenate(bpds)
            results["bpd"] = float(np.mean(bpds))
            if is_chief:
                _atomic_savez(os.path.join(eval_dir, f"ckpt_{ckpt}_bpd.npz"), bpd=bpds,
                              mean_bpd=results["bpd"])
            logging.info("ckpt %d: %s bits/dim %.4f over %d examples", ckpt, ec.bpd_dataset,
                         results["bpd"], len(bpds))

        if ec.enable_sampling:
            results.update(_sample_rounds(config, ckpt, state, ckpt_rng, sample_fn,
                                          inception_fn, data_pool, num_rounds, num_samples,
                                          eval_dir))
        if is_chief:
            _update_summary(eval_dir, ckpt, results)
        logging.info("ckpt %d: %s", ckpt, results)


def _sample_rounds(config, ckpt, state, ckpt_rng, sample_fn, inception_fn, data_pool,
                   num_rounds, num_samples, eval_dir):
    """Sampling rounds for one checkpoint, resumable round by round; returns IS/FID/KID."""
    import evaluation

    folder = os.path.join(eval_dir, f"ckpt_{ckpt}")
    os.makedirs(folder, exist_ok=True)
    is_chief = jax.process_index() == 0
    for r in _progress(range(num_rounds), num_rounds, f"ckpt {ckpt} sampling rounds", config):
        stats_file = os.path.join(folder, f"statistics_{r}.npz")
        if os.path.exists(stats_file):
            continue  # finished before an interruption
        key = jax.random.fold_in(ckpt_rng, 1_000_000 + r)
        samples, nfe = sample_fn(key, state.params_ema, state.model_state)
        samples = to_uint8(_gather(samples))
        features = _features(inception_fn, samples)
        if is_chief:
            _atomic_savez(os.path.join(folder, f"samples_{r}.npz"), samples=samples)
            _atomic_savez(stats_file, **features)
        logging.info("ckpt %d round %d/%d: %d samples, %d NFE", ckpt, r + 1, num_rounds,
                     len(samples), int(nfe))
    pools, logits = [], []
    for r in range(num_rounds):
        with np.load(os.path.join(folder, f"statistics_{r}.npz")) as f:
            pools.append(f["pool_3"])
            logits.append(f["logits"])
    pools = np.concatenate(pools)[:num_samples]
    logits = np.concatenate(logits)[:num_samples]
    scores = {
        "IS": evaluation.inception_score_from_logits(logits),
        "FID": evaluation.fid_from_activations(data_pool, pools),
        "KID": evaluation.kid_from_activations(data_pool, pools),
        "num_samples": int(len(pools)),
    }
    if is_chief:
        _atomic_savez(os.path.join(eval_dir, f"report_{ckpt}.npz"), IS=scores["IS"],
                      fid=scores["FID"], kid=scores["KID"])
    logging.info("ckpt %d: IS %.3f  FID %.3f  KID %.5f", ckpt, scores["IS"], scores["FID"],
                 scores["KID"])
    return scores


def fid_stats(config, workdir: str | None = None) -> str:
    """Inception pool_3 features of every training image (uint8, no dequantization).

    Writes `evaluation.dataset_stats_path(config)` with key 'pool_3'; returns its path.
    """
    validate_config(config, "eval")
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")
    inception_fn = _inception(config)
    train_ds, _, _ = datasets.get_dataset(config, uniform_dequantization=False,
                                          evaluation=True)
    pools = []
    for batch in _progress(train_ds, None, "dataset statistics", config):
        images = to_uint8(batch["image"].numpy())
        pools.append(_features(inception_fn, images)["pool_3"])
    pools = np.concatenate(pools)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        pools = np.asarray(multihost_utils.process_allgather(pools, tiled=True))
    import evaluation

    path = evaluation.dataset_stats_path(config)
    if jax.process_index() == 0:
        evaluation.save_stats(path, pools)
    logging.info("Wrote Inception statistics of %d images to %s", len(pools), path)
    return path
