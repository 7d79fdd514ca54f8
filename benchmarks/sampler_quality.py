"""Sample quality against the number of score evaluations (NFE), for every sampler.

    JAX_PLATFORMS=cpu python benchmarks/sampler_quality.py [WORKDIR] [--ckpt 2] \
        [--config configs/vp/fashion_mnist_ddpmpp_quickstart.py] [--num_samples 512] [--seeds 0,1] \
        [--nfes 5,10,20,50,100] [--samplers em,pc,ode,ddim,dpm_2m,dpm_3m,heun,unipc_bh1] \
        [--runs dpm_2m@20,em@500,...] --data_dir FASHION_MNIST_IDX_FOLDER

WORKDIR is a trained workdir (default: workdir/quickstart, what the README's quickstart
command writes). For each sampler and NFE budget it draws `num_samples` images from checkpoint
`ckpt` with the program `--mode=eval` runs (`run_lib.steps.get_sample_fn`), and prints a
markdown table of
- the true NFE (few-step samplers spend 1 of the budget on the final denoising step; Heun
  takes 2 per step; PC takes 2 per noise level; the adaptive ODE's NFE follows its tolerance),
- the judge FID: Frechet distance of the independent Fashion-MNIST classifier's features
  (`evaluation.judge`) between the samples and the 10,000 test images (lower is better);
- Inception FID against the test set when pytorch-fid's Inception weights are present
  (--inception_weights or the cache; never downloaded here);
- seconds per `num_samples` images (batches of `batch`), compilation excluded (the first
  batch is timed apart);
each row once per seed in `--seeds` (two by default: the mean and each value).
It also prints the judge FID of `num_samples` real training images: the floor that finite
sample size leaves. Samplers: 'em' (Euler-Maruyama, N = NFE), 'pc' (reverse diffusion +
Langevin, N = NFE / 2), 'ode' (probability-flow ODE, dopri5, tolerances chosen per budget),
'ddim', 'dpm_2m', 'dpm_3m' (DPM-Solver++ multistep, logSNR steps), 'heun' (EDM, Karras
steps), 'unipc_bh1', 'unipc_bh2' (UniPC-3 with B(h) = -h or e^{-h} - 1, logSNR steps),
'ipndm' (iPNDM of order 4, Karras steps), 'ipndm_v' (its variable-step weights), and the
stochastic 'ddim_eta1' (DDIM, eta = 1), 'heun_churn' (EDM's Algorithm 2, S_churn = 40) and
'sde_dpm_2m' (SDE-DPM-Solver++ 2M, logSNR steps); plus the defaults 'em' at N = 500 (the
quickstart's sampler) and 'pc' at N = 500.
Writes the table to --out (.md), the raw figures (.json) and a plot (.png).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import configs  # noqa: E402
import data_files  # noqa: E402
import evaluation  # noqa: E402
from evaluation import judge, metrics  # noqa: E402
from run_lib import checkpoints, steps  # noqa: E402
from run_lib.devices import make_mesh, replicated  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLERS = ("em", "pc", "ode", "ddim", "dpm_2m", "dpm_3m", "heun", "unipc_bh1", "unipc_bh2",
            "ipndm", "ipndm_v", "ddim_eta1", "heun_churn", "sde_dpm_2m")
LABELS = {"em": "Euler-Maruyama", "pc": "PC (reverse diffusion + Langevin)",
          "ode": "adaptive ODE (dopri5)", "ddim": "DDIM", "dpm_2m": "DPM-Solver++ 2M",
          "dpm_3m": "DPM-Solver++ 3M", "heun": "Heun (EDM)",
          "unipc_bh1": "UniPC-3, B(h) = -h (bh1)", "unipc_bh2": "UniPC-3, B(h) = e^-h - 1 (bh2)",
          "ipndm": "iPNDM (order 4)", "ipndm_v": "iPNDM, variable-step weights (order 4)",
          "ddim_eta1": "DDIM, eta = 1 (stochastic)",
          "heun_churn": "Heun, churn 40 (EDM Alg. 2, stochastic)",
          "sde_dpm_2m": "SDE-DPM-Solver++ 2M (stochastic)"}
# Tolerances of the adaptive ODE for each NFE budget (dopri5 needs ~6 NFE per step; the
# realized NFE is reported).
# dopri5 cannot go below ~20 NFE (two steps of 6 evaluations plus the first and the denoising),
# so the 5 and 10 budgets have no ODE entry.
ODE_TOLERANCES = {20: 1e-1, 50: 1e-2, 100: 1e-3}


def load_config(path: str):
    """A config file's get_config(), or a workdir's recorded config.json."""
    if path.endswith(".json"):
        import ml_collections
        with open(path) as f:
            return configs.complete(ml_collections.ConfigDict(json.load(f)))
    spec = importlib.util.spec_from_file_location("benchmark_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return configs.complete(module.get_config())


def sampler_settings(name: str, nfe: int, denoise: bool) -> dict:
    """config.sampling (and model.num_scales) overrides that spend about `nfe` evaluations."""
    few = nfe - int(denoise)  # the final denoising step costs one evaluation
    if name == "em":
        return {"method": "pc", "predictor": "euler_maruyama", "corrector": "none",
                "num_scales": nfe}
    if name == "pc":
        return {"method": "pc", "predictor": "reverse_diffusion", "corrector": "langevin",
                "num_scales": max(1, nfe // 2)}
    if name == "ode":
        tol = ODE_TOLERANCES[nfe]
        return {"method": "ode", "ode_method": "dopri5", "ode_rtol": tol, "ode_atol": tol}
    if name == "ddim":
        return {"method": "ddim", "num_steps": few, "eta": 0.0}
    if name in ("dpm_2m", "dpm_3m"):
        return {"method": "dpm_solver", "num_steps": few, "order": int(name[4])}
    if name in ("unipc_bh1", "unipc_bh2"):
        return {"method": "unipc", "num_steps": few, "order": 3, "unipc_variant": name[-3:]}
    if name in ("ipndm", "ipndm_v"):
        return {"method": "ipndm", "num_steps": few, "order": 4,
                "ipndm_variable_steps": name == "ipndm_v"}
    if name == "sde_dpm_2m":
        return {"method": "sde_dpm_solver", "num_steps": few, "order": 2}
    if name == "ddim_eta1":
        return {"method": "ddim", "num_steps": few, "eta": 1.0}
    if name in ("heun", "heun_churn"):
        # churn 40 is EDM's ImageNet setting; with few steps gamma saturates at sqrt(2) - 1.
        return {"method": "heun", "num_steps": max(1, few // 2),
                "churn": 40.0 if name == "heun_churn" else 0.0}
    raise ValueError(f"Unknown sampler {name!r}; valid: {list(SAMPLERS)}.")


def with_settings(config, settings: dict):
    config = configs.complete(config)  # a fresh, locked copy
    for key, value in settings.items():
        if key == "num_scales":
            config.model.num_scales = value
        else:
            config.sampling[key] = value
    return config


def draw(config, state, num_samples: int, batch: int, seed: int):
    """(uint8 images [num_samples, H, W, C], NFE per batch, compile+first s, s per batch)."""
    sde, model = steps.build(config)
    shape = (batch, config.data.image_size, config.data.image_size, config.data.num_channels)
    sample = steps.get_sample_fn(config, sde, model, shape, make_mesh())
    images, nfes, times = [], [], []
    for i in range(-(-num_samples // batch)):
        start = time.perf_counter()
        x, nfe = sample(jax.random.fold_in(jax.random.key(seed), i), state.params_ema,
                        state.model_state)
        x = np.asarray(x)
        times.append(time.perf_counter() - start)
        if not np.all(np.isfinite(x)):  # e.g. VP's discrete betas exceed 1 when N < beta_max
            raise FloatingPointError(f"{config.sampling.method} produced NaN/inf samples.")
        images.append(evaluation.images_to_uint8(x))
        nfes.append(int(nfe))
    steady = times[1:] or times
    return np.concatenate(images)[:num_samples], float(np.mean(nfes)), times[0], float(
        np.mean(steady))


def read_split(data_dir: str, prefix: str) -> np.ndarray:
    images = data_files.read_idx(os.path.join(data_dir, f"{prefix}-images-idx3-ubyte.gz"))
    return images[..., None]


def inception_features(weights_path: str | None):
    """A function uint8 [B, H, W, 1] -> pool_3 [B, 2048], or None without local weights."""
    path = weights_path or os.path.join(evaluation.weights.default_cache_dir(),
                                        evaluation.weights.FID_WEIGHTS_FILENAME)
    if not os.path.exists(path):
        return None
    model = evaluation.get_inception_model(path)
    return lambda x: np.concatenate([np.asarray(model(np.repeat(x[i:i + 100], 3, -1))["pool_3"])
                                     for i in range(0, len(x), 100)])


def plot(rows, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in SAMPLERS:
        pts = sorted((r["nfe"], r["judge_fid"]) for r in rows if r["sampler"] == name)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=LABELS[name])
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("score evaluations per sample (NFE)")
    ax.set_ylabel("judge FID vs. test set (lower is better)")
    floor = [r["judge_fid"] for r in rows if r["sampler"] == "data"]
    if floor:
        ax.axhline(floor[0], color="gray", linestyle="--", label="real images (finite-N floor)")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(rows, inception: bool, num_samples: int) -> str:
    head = ("| sampler | NFE | judge FID, mean of seeds | per seed |"
            + (" Inception FID |" if inception else "") + f" s / {num_samples} samples |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    order = ("data",) + SAMPLERS
    for r in sorted(rows, key=lambda r: (order.index(r["sampler"]), r["nfe"])):
        inc = f" {r['inception_fid']:.2f} |" if inception else ""
        seeds = ", ".join(f"{v:.2f}" for v in r.get("judge_fids", [r["judge_fid"]]))
        lines.append(f"| {r['label']} | {r['nfe']:.0f} | {r['judge_fid']:.2f} | {seeds} |{inc} "
                     f"{r.get('seconds_per_samples', 0.0):.1f} |")
    return "\n".join(lines)


def planned_runs(args) -> list[tuple[str, int]]:
    """(sampler, NFE budget) pairs: every sampler at every budget (the adaptive ODE only at
    budgets it has a tolerance for), then the defaults."""
    if args.runs:  # an explicit list, in the order given (most important first)
        runs = [(name, int(budget)) for name, budget in
                (pair.split("@") for pair in args.runs.split(","))]
        for name, budget in runs:
            if name not in SAMPLERS or (name == "ode" and budget not in ODE_TOLERANCES):
                raise SystemExit(f"--runs: unknown sampler@budget {name}@{budget}; samplers "
                                 f"{list(SAMPLERS)}, ode budgets {sorted(ODE_TOLERANCES)}.")
        return runs
    runs = [(name, nfe) for nfe in map(int, args.nfes.split(","))
            for name in args.samplers.split(",") if name != "ode" or nfe in ODE_TOLERANCES]
    return runs + [(name, 500 if name == "em" else 1000)
                   for name in args.defaults.split(",") if name]


def load_rows(path: str, meta: dict) -> dict:
    """Rows of an earlier run with the same workdir, checkpoint, sample count and seed."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        saved = json.load(f)
    if saved.get("meta") != meta:
        return {}
    return {f"{r['sampler']}@{r['budget']}": r for r in saved["rows"] if r["sampler"] != "data"}


def save_rows(path: str, meta: dict, rows: list) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    os.replace(path + ".tmp", path)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", nargs="?", default=os.path.join(ROOT, "workdir", "quickstart"))
    parser.add_argument("--config", default=os.path.join(
        ROOT, "configs", "vp", "fashion_mnist_ddpmpp_quickstart.py"))
    parser.add_argument("--ckpt", type=int, default=2)
    parser.add_argument("--data_dir", required=True,
                        help="folder with the Fashion-MNIST IDX files (train-*, t10k-*)")
    parser.add_argument("--num_samples", type=int, default=512)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--seeds", default="0,1", help="offsets added to config.seed; each "
                        "row is measured once per seed and reports the mean and each value")
    parser.add_argument("--nfes", default="5,10,20,50,100")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--defaults", default="em,pc", help="samplers also run at N = 500")
    parser.add_argument("--runs", default="", help="sampler@budget pairs, e.g. "
                        "'dpm_2m@20,em@500', run in this order instead of the full grid")
    parser.add_argument("--judge", default=judge.JUDGE_PATH)
    parser.add_argument("--inception_weights", default="")
    parser.add_argument("--out", default=os.path.join(ROOT, "assets", "sampler_quality"))
    return parser.parse_args()


def restore(args):
    """The benchmark's config (data from args.data_dir) and the checkpoint's train state."""
    config = load_config(args.config)
    config.unlock()
    config.data.data_dir = args.data_dir
    config.eval.show_progress = False
    config.lock()
    rng = jax.random.PRNGKey(config.seed)  # the State's key layout, as run_lib.evaluate
    abstract = checkpoints.abstract_state(config, rng, replicated(make_mesh()))
    snapshots, _ = checkpoints.managers(args.workdir, config, create=False)
    state = checkpoints.restore(snapshots, args.ckpt, abstract)
    print(f"backend={jax.default_backend()} devices={jax.device_count()} workdir={args.workdir} "
          f"checkpoint_{args.ckpt} (step {int(state.step)}) load={os.getloadavg()[0]:.1f}")
    return config, state


def scorer(args):
    """score(images) -> {'judge_fid', and 'inception_fid' where Inception weights exist}."""
    judge_params = judge.load(args.judge)
    test = read_split(args.data_dir, "t10k")
    _, test_features = judge.logits_and_features(judge_params, test)
    inception = inception_features(args.inception_weights)
    test_pool = inception(test) if inception else None
    if inception is None:
        print("Inception FID: not computed (no pytorch-fid Inception weights on this machine).")

    def score(images):
        result = {"judge_fid": metrics.fid_from_activations(
            test_features, judge.logits_and_features(judge_params, images)[1])}
        if inception:
            result["inception_fid"] = metrics.fid_from_activations(test_pool, inception(images))
        return result

    return score, inception is not None


def main():
    args = parse_args()
    config, state = restore(args)
    denoise = bool(config.sampling.noise_removal)
    score, with_inception = scorer(args)
    seeds = [int(config.seed) + int(v) for v in args.seeds.split(",")]
    meta = {"workdir": os.path.abspath(args.workdir), "ckpt": args.ckpt,
            "num_samples": args.num_samples, "seeds": seeds}
    done = load_rows(args.out + ".json", meta)
    train = read_split(args.data_dir, "train")
    pick = np.random.default_rng(0).choice(len(train), args.num_samples, replace=False)
    rows = [{"sampler": "data", "label": f"real training images ({args.num_samples})",
             "budget": 0, "nfe": 0, "seconds_per_batch": 0.0, **score(train[pick])}]
    batches = -(-args.num_samples // args.batch)
    for name, budget in planned_runs(args):
        key = f"{name}@{budget}"
        if key in done:  # measured by an earlier (interrupted) run of this benchmark
            rows.append(done[key])
            continue
        settings = sampler_settings(name, budget, denoise)
        scores, per_batches, firsts = [], [], []
        try:
            for seed in seeds:
                images, nfe, first, per_batch = draw(with_settings(config, settings), state,
                                                     args.num_samples, args.batch, seed)
                scores.append(score(images))
                per_batches.append(per_batch)
                firsts.append(first)
        except FloatingPointError as e:
            print(f"{name} budget {budget}: skipped, {e}", flush=True)
            continue
        mean = {k: float(np.mean([sc[k] for sc in scores])) for k in scores[0]}
        per_batch = float(np.mean(per_batches))
        row = {"sampler": name, "label": LABELS[name], "budget": budget, "nfe": nfe,
               "settings": settings, "compile_and_first_batch_s": firsts[0],
               "seconds_per_batch": per_batch, "batch": args.batch,
               "seconds_per_samples": per_batch * batches,
               "judge_fids": [sc["judge_fid"] for sc in scores],
               "load_average": os.getloadavg()[0], **mean}
        rows.append(row)
        save_rows(args.out + ".json", meta, rows)
        print(f"{name:10s} budget {budget:4d} NFE {nfe:6.1f} judge FID {row['judge_fid']:8.2f} "
              f"({', '.join(f'{v:.2f}' for v in row['judge_fids'])}) "
              f"{row['seconds_per_samples']:7.1f} s / {args.num_samples} samples (first batch "
              f"{firsts[0]:.1f} s) load {row['load_average']:.1f}", flush=True)

    md = table(rows, with_inception, args.num_samples)
    print(md)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(md + "\n")
    save_rows(args.out + ".json", meta, rows)
    plot(rows, args.out + ".png")


if __name__ == "__main__":
    main()
