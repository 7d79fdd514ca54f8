"""Why a sampler's samples are poor: judge FID and the fraction of speckled samples per setting.

    JAX_PLATFORMS=cpu python benchmarks/sampler_diagnosis.py [WORKDIR] --ckpt 2 \
        --data_dir FASHION_MNIST_IDX_FOLDER --num_samples 256 \
        --runs 'dpm_2m@20;dpm_2m@20:thresholding=clip;heun@20:schedule=logsnr'

Each run is `sampler@NFE` of `benchmarks/sampler_quality.py` (the same settings and the same
program as `--mode=eval`), optionally followed by `:key=value+key=value` overrides of
config.sampling (e.g. thresholding=dynamic, schedule=time_uniform, noise_removal=False,
rho=3.0). Every run draws the same `num_samples` images from the same seed (one batch) and
reports
- the judge FID (`evaluation.judge` features, against the 10,000 test images; lower is better),
- the speckled fraction: samples whose mean absolute difference between neighbouring pixels
  exceeds the 99.5th percentile of the test images' (so 0.5% of real images count as
  speckled); speckled noise is far above it, clean garments below,
- the fraction of pixels at the ends of the range (0 or 255 after quantization).
Rows are appended to --out (.json); a grid of the first 64 samples of each run is written
next to it (.png per run) to check the speckle measure by eye. Times are not reported: these
are quality figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import sampler_quality as sq  # noqa: E402

SPECKLE_PERCENTILE = 99.5


def roughness(images: np.ndarray) -> np.ndarray:
    """Mean absolute difference of neighbouring pixels per image, uint8 [N, H, W, C] -> [N]."""
    x = images.astype(np.float64) / 255.0
    dx = np.abs(np.diff(x, axis=1)).mean(axis=(1, 2, 3))
    dy = np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3))
    return (dx + dy) / 2


def parse_run(spec: str) -> tuple[str, int, dict]:
    head, _, rest = spec.partition(":")
    name, budget = head.split("@")
    overrides = {}
    for item in filter(None, rest.split("+")):
        key, value = item.split("=")
        overrides[key] = json.loads(value.lower()) if value.lower() in (
            "true", "false") else _number_or_text(value)
    return name, int(budget), overrides


def _number_or_text(value: str):
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def save_grid(images: np.ndarray, path: str) -> None:
    from PIL import Image

    n = int(np.sqrt(min(64, len(images))))
    tiles = images[: n * n, ..., 0]
    h, w = tiles.shape[1:]
    grid = tiles.reshape(n, n, h, w).transpose(0, 2, 1, 3).reshape(n * h, n * w)
    Image.fromarray(grid).save(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir")
    parser.add_argument("--config", default=os.path.join(
        sq.ROOT, "configs", "vp", "fashion_mnist_ddpmpp_quickstart.py"))
    parser.add_argument("--ckpt", type=int, default=2)
    parser.add_argument("--data_dir", required=True)
    parser.add_argument("--num_samples", type=int, default=256)
    parser.add_argument("--runs", required=True, help="';'-separated sampler@NFE[:k=v+k=v]")
    parser.add_argument("--judge", default=sq.judge.JUDGE_PATH)
    parser.add_argument("--inception_weights", default="")
    parser.add_argument("--out", required=True, help="path without extension")
    parser.add_argument("--params", default="ema", choices=("ema", "raw"),
                        help="sample with the EMA of the parameters (as every mode does) or "
                             "the optimizer's last iterate (to measure what the EMA adds)")
    args = parser.parse_args()

    config, state = sq.restore(args)
    if args.params == "raw":
        state = state.replace(params_ema=state.params)
    score, _ = sq.scorer(args)
    test = sq.read_split(args.data_dir, "t10k")
    limit = np.percentile(roughness(test), SPECKLE_PERCENTILE)
    rows = []
    if os.path.exists(args.out + ".json"):
        with open(args.out + ".json") as f:
            rows = json.load(f)
    done = {r["run"] for r in rows}
    if "data" not in done:  # the floor that this sample count leaves
        train = sq.read_split(args.data_dir, "train")
        real = train[np.random.default_rng(0).choice(len(train), args.num_samples, False)]
        rows.append({"run": "data", "num_samples": args.num_samples, "nfe": 0,
                     "speckled": float(np.mean(roughness(real) > limit)), **score(real)})
        print(f"real training images: judge FID {rows[-1]['judge_fid']:.2f} speckled "
              f"{rows[-1]['speckled']:.3f}", flush=True)
    for spec in filter(None, args.runs.split(";")):
        if spec in done:
            continue
        name, budget, overrides = parse_run(spec)
        settings = {**sq.sampler_settings(name, budget, bool(config.sampling.noise_removal)),
                    **overrides}
        if "noise_removal" in overrides and name not in ("em", "pc", "ode"):
            # keep the NFE budget: without the final denoising step, one more solver step
            few = budget - int(overrides["noise_removal"])
            settings["num_steps"] = max(1, few // 2) if name.startswith("heun") else few
        try:
            images, nfe, _, _ = sq.draw(sq.with_settings(config, settings), state,
                                        args.num_samples, args.num_samples, config.seed)
        except FloatingPointError as e:
            print(f"{spec}: {e}", flush=True)
            continue
        r = roughness(images)
        row = {"run": spec, "settings": settings, "nfe": nfe, "num_samples": args.num_samples,
               "seed": int(config.seed), "speckled": float(np.mean(r > limit)),
               "saturated_pixels": float(np.mean((images == 0) | (images == 255))),
               "load_average": os.getloadavg()[0], **score(images)}
        rows.append(row)
        save_grid(images, f"{args.out}_{len(rows):02d}.png")
        with open(args.out + ".json", "w") as f:
            json.dump(rows, f, indent=1)
        print(f"{spec:50s} NFE {nfe:5.1f} judge FID {row['judge_fid']:8.2f} speckled "
              f"{row['speckled']:.3f} load {row['load_average']:.1f}", flush=True)


if __name__ == "__main__":
    main()
