"""Evaluators, prepared once and run per checkpoint (in the style of big_vision's evaluators).

Each evaluator's constructor does everything that can fail on bad input (datasets, weight and
statistics files) and builds its programs; `run(state, ckpt, key)` evaluates one checkpoint's
state and returns a dict of figures, writing its files under the evaluation folder.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from absl import logging

import datasets
import evaluation
from run_lib import files, logs
from run_lib.build import build_step_fns, get_bpd_fn, get_sample_fn
from run_lib.devices import batch_sharded, gather, local_part, replicated, to_global
from run_lib.interrupt import Interrupted, interrupted


class LossEvaluator:
    """Mean denoising loss of the EMA parameters over the evaluation split."""

    def __init__(self, config, sde, model, mesh, eval_dir):
        _, self.dataset, _ = datasets.get_dataset(
            config, uniform_dequantization=config.data.uniform_dequantization, evaluation=True)
        _, self.eval_losses = build_step_fns(config, sde, model, None, mesh)
        self.scaler = datasets.get_data_scaler(config)
        self.sharding = batch_sharded(mesh, leading_axes=1)
        self.config, self.eval_dir = config, eval_dir

    def run(self, state, ckpt, key):
        del key  # the loss draws from the state's own key, folded with each batch's index
        values = []
        bar = logs.progress(self.dataset, None, f"ckpt {ckpt} loss",
                            self.config.eval.show_progress)
        for i, batch in enumerate(bar):
            x = to_global(self.scaler(batch["image"].numpy())[None], self.sharding)
            values.append(float(self.eval_losses(state, x, i)[0]))
        mean = float(np.mean(values))
        if files.is_chief():
            files.atomic_savez(os.path.join(self.eval_dir, f"ckpt_{ckpt}_loss.npz"),
                               all_losses=np.asarray(values), mean_loss=mean)
        logging.info("ckpt %d: eval loss %.5f", ckpt, mean)
        return {"loss": mean}


class BpdEvaluator:
    """Bits/dim through the probability-flow ODE on uniformly dequantized data (App. D.2)."""

    def __init__(self, config, sde, model, mesh, eval_dir):
        ec = config.eval
        train_ds, test_ds, _ = datasets.get_dataset(config, uniform_dequantization=True,
                                                    evaluation=True)
        self.dataset = train_ds if ec.bpd_dataset == "train" else test_ds
        # Test-set bits/dim average several passes of fresh dequantization noise.
        self.repeats = 1 if ec.bpd_dataset == "train" else int(ec.bpd_num_repeats)
        self.sharding = batch_sharded(mesh)
        # The same program as --mode=likelihood's.
        self.bpd_fn = get_bpd_fn(config, sde, model, mesh)
        self.scaler = datasets.get_data_scaler(config)
        self.config, self.eval_dir = config, eval_dir

    def run(self, state, ckpt, key):
        ec, bpds = self.config.eval, []
        for repeat in range(self.repeats):
            batches = self.dataset.take(ec.num_bpd_batches) if ec.num_bpd_batches > 0 \
                else self.dataset
            desc = f"ckpt {ckpt} bits/dim pass {repeat + 1}/{self.repeats}"
            for i, batch in enumerate(logs.progress(batches, None, desc, ec.show_progress)):
                x = to_global(self.scaler(batch["image"].numpy()), self.sharding)
                batch_key = jax.random.fold_in(jax.random.fold_in(key, repeat), i)
                bpds.append(gather(self.bpd_fn(batch_key, state.params_ema, state.model_state,
                                               x)))
        bpds = np.concatenate(bpds)
        mean = float(np.mean(bpds))
        if files.is_chief():
            files.atomic_savez(os.path.join(self.eval_dir, f"ckpt_{ckpt}_bpd.npz"), bpd=bpds,
                               mean_bpd=mean)
        logging.info("ckpt %d: %s bits/dim %.4f over %d examples", ckpt, ec.bpd_dataset, mean,
                     len(bpds))
        return {"bpd": mean}


class InceptionScorer:
    """The FID Inception on the run's mesh: each host scores its own rows, then all gather."""

    # Images per device per call: bounds the memory of 299 x 299 activations.
    PER_DEVICE = 25

    def __init__(self, config, mesh):
        variables = evaluation.load_inception_variables(config.eval.inception_weights or None)
        self.variables = jax.device_put(variables, replicated(mesh))
        self.sharding = batch_sharded(mesh)
        self.apply = jax.jit(evaluation.inception.apply,
                             in_shardings=(replicated(mesh), self.sharding),
                             out_shardings=self.sharding)
        self.chunk = self.PER_DEVICE * jax.local_device_count()

    def __call__(self, local_uint8: np.ndarray) -> dict[str, np.ndarray]:
        """This host's uint8 images [n, H, W, C] -> every host's features, in global order."""
        n = len(local_uint8)
        padded = math.ceil(n / self.chunk) * self.chunk
        local = np.concatenate([local_uint8, np.zeros((padded - n,) + local_uint8.shape[1:],
                                                      np.uint8)])
        parts = {"pool_3": [], "logits": []}
        for start in range(0, padded, self.chunk):
            out = self.apply(self.variables, to_global(local[start:start + self.chunk],
                                                       self.sharding))
            for k in parts:
                parts[k].append(local_part(out[k]))
        local_features = {k: np.concatenate(v)[:n].astype(np.float32) for k, v in parts.items()}
        return {k: gather(v) for k, v in local_features.items()}


class SampleQualityEvaluator:
    """Samples in rounds of eval.batch_size, resumable round by round; IS, FID and KID."""

    def __init__(self, config, sde, model, mesh, eval_dir):
        ec = config.eval
        # Statistics and weights load first: a missing file fails before any compile.
        self.data_pool = evaluation.load_dataset_stats(config)["pool_3"]
        self.scorer = InceptionScorer(config, mesh)
        self.num_samples = ec.fast_fid_num_samples if ec.fast_fid else ec.num_samples
        self.num_rounds = int(math.ceil(self.num_samples / ec.batch_size))
        shape = (ec.batch_size, config.data.image_size, config.data.image_size,
                 config.data.num_channels)
        self.sample_fn = get_sample_fn(config, sde, model, shape, mesh)
        self.config, self.eval_dir = config, eval_dir

    def run(self, state, ckpt, key):
        folder = os.path.join(self.eval_dir, f"ckpt_{ckpt}")
        os.makedirs(folder, exist_ok=True)
        bar = logs.progress(range(self.num_rounds), self.num_rounds,
                            f"ckpt {ckpt} sampling rounds", self.config.eval.show_progress)
        for r in bar:
            stats_file = os.path.join(folder, f"statistics_{r}.npz")
            if os.path.exists(stats_file):
                continue  # finished before an interruption
            samples, nfe = self.sample_fn(jax.random.fold_in(key, r), state.params_ema,
                                          state.model_state)
            if interrupted():
                raise Interrupted(f"Interrupted before sampling round {r} of checkpoint {ckpt}; "
                                  "finished rounds are kept and a rerun resumes after them.")
            local = evaluation.images_to_uint8(files.checked_images(
                local_part(samples), f"samples of checkpoint {ckpt}, round {r}"))
            features = self.scorer(local)
            samples = gather(local)
            if files.is_chief():
                files.atomic_savez(os.path.join(folder, f"samples_{r}.npz"), samples=samples)
                files.atomic_savez(stats_file, **features)
            logging.info("ckpt %d round %d/%d: %d samples, %d NFE", ckpt, r + 1,
                         self.num_rounds, len(samples), int(nfe))
        return self._scores(folder, ckpt)

    def _scores(self, folder, ckpt):
        rounds = [np.load(os.path.join(folder, f"statistics_{r}.npz"))
                  for r in range(self.num_rounds)]
        pools = np.concatenate([f["pool_3"] for f in rounds])[:self.num_samples]
        logits = np.concatenate([f["logits"] for f in rounds])[:self.num_samples]
        scores = {"IS": evaluation.inception_score_from_logits(logits),
                  "FID": evaluation.fid_from_activations(self.data_pool, pools),
                  "KID": evaluation.kid_from_activations(self.data_pool, pools),
                  "num_samples": int(len(pools))}
        if files.is_chief():
            files.atomic_savez(os.path.join(self.eval_dir, f"report_{ckpt}.npz"),
                               IS=scores["IS"], fid=scores["FID"], kid=scores["KID"])
        logging.info("ckpt %d: IS %.3f  FID %.3f  KID %.5f", ckpt, scores["IS"],
                     scores["FID"], scores["KID"])
        return scores


EVALUATORS = {"loss": ("enable_loss", LossEvaluator), "bpd": ("enable_bpd", BpdEvaluator),
              "samples": ("enable_sampling", SampleQualityEvaluator)}


def enabled_evaluators(config, sde, model, mesh, eval_dir) -> dict:
    """The evaluators `config.eval.enable_*` switches on, in a fixed order."""
    return {name: cls(config, sde, model, mesh, eval_dir)
            for name, (switch, cls) in EVALUATORS.items() if config.eval[switch]}
