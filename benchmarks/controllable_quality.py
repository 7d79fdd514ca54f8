"""Quality of class-conditional sampling and inpainting, judged by an independent classifier.

    python benchmarks/controllable_quality.py --workdir=workdir/quickstart

On a trained Fashion-MNIST workdir (the quickstart) with its noise-conditional classifier
(`--mode=train_classifier`), this runs the project's own modes and scores their outputs with
`evaluation.judge`, a CNN trained separately on clean images (nothing shared with the score
model or the guidance classifier):

(a) --mode=conditional, `per_class` samples of every class at each guidance scale: the rate at
    which the judge recognises the requested class, per class and on average;
(b) --mode=inpaint of the lower half of the first `num_inputs` test images: the rate at which the
    judge gives the inpainted image the true class, next to the rate for the unmasked originals,
    for the masked inputs (lower half grey), and for unconditional samples (--mode=sample, the
    i-th sample against the i-th test label: the chance level of a sampler that ignores the
    known half).

Every run resumes where it stopped (the modes' batches), so the script can be interrupted.
Prints a markdown table; writes <workdir>/controllable_quality.json and, with --pictures, the
README pictures (an inpainting grid and a class-conditional grid).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import datasets  # noqa: E402
import run_lib  # noqa: E402
from configs.vp import fashion_mnist_ddpmpp_quickstart  # noqa: E402
from evaluation import judge  # noqa: E402
from run_lib import files  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "A trained Fashion-MNIST workdir with a classifier.")
flags.DEFINE_string("data_dir", "", "Fashion-MNIST IDX folder ('' = the config's).")
flags.DEFINE_integer("per_class", 20, "Class-conditional samples per class.")
flags.DEFINE_list("scales", ["1.0"], "Guidance scales to measure.")
flags.DEFINE_integer("num_inputs", 200, "Test images to inpaint (and unconditional samples).")
flags.DEFINE_integer("batch_size", 100, "Images per batch (config.eval.batch_size).")
flags.DEFINE_string("pictures", "", "Folder for the README pictures ('' = none).")
flags.DEFINE_bool("inpainting", True, "Also measure inpainting (b); --noinpainting: (a) only.")
flags.DEFINE_string("judge", judge.JUDGE_PATH, "The judge's weights (.npz).")
flags.mark_flag_as_required("workdir")


def _config(**overrides):
    config = fashion_mnist_ddpmpp_quickstart.get_config()
    config.eval.batch_size = FLAGS.batch_size
    config.eval.show_progress = False
    if FLAGS.data_dir:
        config.data.data_dir = FLAGS.data_dir
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def _timed(mode, config):
    t0 = time.time()
    folder = run_lib.MODES[mode](config, FLAGS.workdir, "eval")
    return folder, time.time() - t0


def _test_labels(config, n):
    _, test_ds, _ = datasets.get_dataset(config, evaluation=True)
    labels = np.concatenate([b["label"].numpy() for b in test_ds.take(-(-n // FLAGS.batch_size))])
    return labels[:n]


def conditional_rates(params, scale):
    n = FLAGS.per_class * len(judge.CLASSES)
    config = _config(**{"controllable.labels": "all", "sample.num_samples": n,
                        "controllable.scale": float(scale),
                        "sample.out": f"quality/conditional_scale_{scale}"})
    folder, secs = _timed("conditional", config)
    data = np.load(os.path.join(folder, "samples.npz"))
    predicted = judge.classify(params, data["samples"])
    per_class = {judge.CLASSES[y]: float(np.mean(predicted[data["labels"] == y] == y))
                 for y in range(len(judge.CLASSES))}
    return {"scale": float(scale), "num_samples": n, "per_class": per_class,
            "mean": float(np.mean(list(per_class.values()))), "seconds": secs,
            "folder": folder}


def inpainting_rates(params):
    n = FLAGS.num_inputs
    config = _config(**{"controllable.source": "test", "controllable.num_inputs": n,
                        "controllable.mask": "half", "controllable.half": "lower",
                        "sample.out": "quality/inpaint_lower_half"})
    folder, secs = _timed("inpaint", config)
    labels = _test_labels(config, n)
    load = lambda name: np.load(os.path.join(folder, f"{name}.npz"))["samples"]
    rate = lambda images: float(np.mean(judge.classify(params, images) == labels))
    out = {"num_inputs": n, "inpainted": rate(load("result")), "original": rate(load("input")),
           "masked": rate(load("masked")), "seconds": secs, "folder": folder}
    config = _config(**{"sample.num_samples": n, "sample.out": "quality/unconditional"})
    folder, secs = _timed("sample", config)
    out["unconditional"] = rate(np.load(os.path.join(folder, "samples.npz"))["samples"])
    out["unconditional_seconds"] = secs
    return out


def write_pictures(conditional, inpainting, folder):
    """A row per class (up to 8 samples) of the best-scoring guidance scale, and the first 8
    inpainting inputs: originals, masked, inpainted."""
    os.makedirs(folder, exist_ok=True)
    best = max(conditional, key=lambda r: r["mean"])
    data = np.load(os.path.join(best["folder"], "samples.npz"))
    cols = min(FLAGS.per_class, 8)
    rows = [data["samples"][data["labels"] == y][:cols] for y in range(len(judge.CLASSES))]
    files.save_image_grid(np.concatenate(rows), os.path.join(folder,
                                                             "conditional_quickstart.png"),
                          cols=cols)
    load = lambda name: np.load(os.path.join(inpainting["folder"], f"{name}.npz"))["samples"][:8]
    files.save_image_grid(np.concatenate([load("input"), load("masked"), load("result")]),
                          os.path.join(folder, "inpainting_quickstart.png"), cols=8)


def main(argv):
    del argv
    logging.set_verbosity(logging.INFO)
    run_lib.logs.install_filter()
    params = judge.load(FLAGS.judge)
    results = {"conditional": []}
    for scale in FLAGS.scales:
        results["conditional"].append(conditional_rates(params, scale))
        print(f"scale {scale}: recognised {results['conditional'][-1]['mean']:.1%} "
              f"({results['conditional'][-1]['seconds']:.0f} s)", flush=True)
    results["inpainting"] = inpainting_rates(params) if FLAGS.inpainting else None
    results["load"] = os.getloadavg()
    with open(os.path.join(FLAGS.workdir, "controllable_quality.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n| guidance scale | " + " | ".join(judge.CLASSES) + " | mean |")
    print("|---" * (len(judge.CLASSES) + 2) + "|")
    for r in results["conditional"]:
        print(f"| {r['scale']:g} | " + " | ".join(f"{v:.0%}" for v in r["per_class"].values())
              + f" | **{r['mean']:.1%}** |")
    i = results["inpainting"]
    if i is None:
        print(f"Load average during the run: {results['load']}")
        return
    print(f"\nInpainting the lower half of {i['num_inputs']} test images: the judge gives the "
          f"true class to {i['inpainted']:.1%} of the inpainted images; originals "
          f"{i['original']:.1%}, masked inputs {i['masked']:.1%}, unconditional samples "
          f"{i['unconditional']:.1%}.")
    print(f"Load average during the run: {results['load']}")
    if FLAGS.pictures:
        write_pictures(results["conditional"], i, FLAGS.pictures)


if __name__ == "__main__":
    app.run(main)
