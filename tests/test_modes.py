"""The generating modes and the classifier on the tiny config: files, shapes, resumption and the
one-line errors for bad input.

End-to-end runs are subprocesses of main.py (as a user would start them) on a copy of the
`trained` workdir; the error cases fail before anything is compiled, so they are called
in-process.
"""

import json
import os
import shutil

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image
from run_helpers import ENV, ROOT, main_args, read_idx, run

import run_lib
from configs import tiny_test
from run_lib import checkpoints, generate
from run_lib.devices import make_mesh, replicated

QUIET = ("--config.eval.show_progress=False",)


@pytest.fixture(scope="module")
def workdir(trained, tmp_path_factory):
    """A copy of the trained tiny workdir (checkpoint_1 and checkpoint_2, steps 6 and 12)."""
    path = str(tmp_path_factory.mktemp("modes") / "w")
    shutil.copytree(trained["straight"], path)
    return path


@pytest.fixture(scope="module")
def classifier_runs(workdir, data_dir):
    """The logs of a classifier run of 3 steps in `workdir`, then one resumed to 6."""
    first = run(main_args("train_classifier", workdir, data_dir,
                          "--config.classifier.n_iters=3"))
    second = run(main_args("train_classifier", workdir, data_dir))
    return first.stderr, second.stderr


@pytest.fixture(scope="module")
def png_folder(data_dir, tmp_path_factory):
    """The first 5 test images as PNG files, plus a text file that must be ignored."""
    folder = tmp_path_factory.mktemp("pngs")
    images = read_idx(os.path.join(data_dir, "t10k-images-idx3-ubyte.gz"))[:5]
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"img_{i}.png")
    (folder / "notes.txt").write_text("not an image")
    return str(folder), images[..., None]


def _config(**overrides):
    config = tiny_test.get_config()
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


# ---------------------------------------------------------------------------- classifier


def test_train_classifier_writes_checkpoints_summary_and_resumes(workdir, classifier_runs):
    first_log, second_log = classifier_runs
    folder = os.path.join(workdir, "classifier")
    assert sorted(os.listdir(os.path.join(folder, "checkpoints"))) == ["checkpoint_3",
                                                                        "checkpoint_6"]
    assert "Resumed the classifier from" in second_log and "at step 3" in second_log
    assert "classifier step 4/6" in second_log and "classifier step 2/3" in first_log
    with open(os.path.join(folder, "summary.json")) as f:
        summary = json.load(f)
    assert sorted(summary) == ["3", "6"]
    assert sorted(summary["6"]) == ["t=0.0", "t=0.25", "t=0.5", "t=0.75", "t=1.0"]
    # One test batch of 8: accuracies are multiples of 1/8.
    for value in summary["6"].values():
        assert 0.0 <= value <= 1.0 and (value * 8) == int(value * 8)
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["classifier"]["channel_multiplier"] == 1
    assert os.listdir(os.path.join(folder, "tensorboard"))


def test_create_classifier_reads_project_folder_and_msgpack(workdir, classifier_runs, tmp_path):
    import flax
    import jax

    from models import utils as mutils

    folder = os.path.join(workdir, "classifier")
    classifier, params = mutils.create_classifier(jax.random.PRNGKey(0), 4, folder)
    stored = checkpoints.restore(
        checkpoints.managers(folder, _config(), create=False)[0], 6,
        run_lib.classifier.abstract_state(_config(), replicated(make_mesh()))).params
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(stored),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = np.zeros((2, 28, 28, 1), np.float32)
    logits = classifier.apply({"params": params}, x, np.array([0.1, 1.0], np.float32),
                              train=False)
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
    # The reference's format: a flax msgpack of the parameters.
    msgpack = tmp_path / "classifier.msgpack"
    msgpack.write_bytes(flax.serialization.to_bytes(params))
    _, again = mutils.create_classifier(jax.random.PRNGKey(1), 4, str(msgpack),
                                        blocks_per_group=1, channel_multiplier=1,
                                        image_shape=(28, 28, 1))
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="does not match the classifier's config: parameter"):
        mutils.create_classifier(jax.random.PRNGKey(1), 4, str(msgpack),
                                 image_shape=(28, 28, 1))


# ---------------------------------------------------------------------------- sample


def test_sample_writes_npz_and_grids_and_resumes_exactly(workdir, data_dir, tmp_path):
    args = ("--config.sample.num_samples=20", *QUIET)
    run(main_args("sample", workdir, data_dir, *args))
    folder = os.path.join(workdir, "sample", "ckpt_2")
    samples = np.load(os.path.join(folder, "samples.npz"))["samples"]
    assert samples.shape == (20, 28, 28, 1) and samples.dtype == np.uint8
    assert samples.std() > 0
    batches = sorted(os.listdir(os.path.join(folder, "batches")))
    assert batches == ["batch_0.npz", "batch_0.png", "batch_1.npz", "batch_1.png",
                       "batch_2.npz", "batch_2.png", "settings.json"]
    assert Image.open(os.path.join(folder, "samples.png")).size == (5 * 30 + 2, 4 * 30 + 2)
    # What a run killed during batch 1 leaves: batch 0 and a half-written file.
    copy = str(tmp_path / "resumed")
    shutil.copytree(folder, copy)
    for name in ("batch_1.npz", "batch_1.png", "batch_2.npz", "batch_2.png"):
        os.remove(os.path.join(copy, "batches", name))
    os.remove(os.path.join(copy, "samples.npz"))
    with open(os.path.join(copy, "batches", "batch_1.npz.tmp-99.npz"), "wb") as f:
        f.write(b"PK\x03\x04 truncated")
    proc = run(main_args("sample", workdir, data_dir, *args, f"--config.sample.out={copy}"))
    assert "Resuming: 1 of 3 batches" in proc.stderr
    np.testing.assert_array_equal(np.load(os.path.join(copy, "samples.npz"))["samples"],
                                  samples)
    assert not [n for n in os.listdir(os.path.join(copy, "batches")) if ".tmp-" in n]


def test_run_batches_resumes_extends_and_refuses_other_settings(tmp_path):
    calls = []

    def produce(i):
        calls.append(i)
        return {"x": np.full((2, 3), i, np.int32)}

    folder = str(tmp_path)
    out = generate.run_batches(folder, 2, produce, {"seed": 1}, "test", show_progress=False)
    np.testing.assert_array_equal(out["x"][:, 0], [0, 0, 1, 1])
    # More batches with the same settings: only the new one is computed.
    out = generate.run_batches(folder, 3, produce, {"seed": 1}, "test", show_progress=False)
    assert calls == [0, 1, 2] and out["x"].shape == (6, 3)
    with pytest.raises(run_lib.UsageError, match="holds batches made with other settings "
                                                 r"\(different seed\)"):
        generate.run_batches(folder, 3, produce, {"seed": 2}, "test", show_progress=False)


# ---------------------------------------------------------------------------- inpaint, colorize


def test_inpaint_from_a_folder_keeps_known_pixels(workdir, data_dir, png_folder, tmp_path):
    folder, images = png_folder
    out = str(tmp_path / "inpaint")
    run(main_args("inpaint", workdir, data_dir, f"--config.controllable.source={folder}",
                  "--config.controllable.mask=box", "--config.controllable.box=4,6,10,12",
                  "--config.controllable.samples_per_input=2", f"--config.sample.out={out}",
                  *QUIET))
    np.testing.assert_array_equal(np.load(os.path.join(out, "input.npz"))["samples"], images)
    mask = np.load(os.path.join(out, "mask.npz"))["mask"]
    assert mask.shape == (5, 28, 28, 1) and mask.sum() == 5 * (28 * 28 - 10 * 12)
    assert np.all(mask[:, 4:14, 6:18] == 0)
    result = np.load(os.path.join(out, "result.npz"))["samples"]
    assert result.shape == (10, 28, 28, 1) and result.dtype == np.uint8
    # Known pixels come back as they were (up to the truncation of the uint8 rule).
    known = np.repeat(mask, 2, axis=0) == 1
    diff = np.abs(result.astype(int) - np.repeat(images, 2, axis=0).astype(int))
    assert diff[known].max() <= 1
    masked = np.load(os.path.join(out, "masked.npz"))["samples"]
    assert np.all(masked[mask == 0] == 128) and np.all(masked[mask == 1] == images[mask == 1])
    with open(os.path.join(out, "index.json")) as f:
        assert json.load(f)["names"] == [f"img_{i}.png" for i in range(5)]
    # A row per input: input, masked and its 2 samples.
    assert Image.open(os.path.join(out, "comparison.png")).size == (4 * 30 + 2, 5 * 30 + 2)


def _colour_checkpoint(workdir):
    """An initialized (untrained) 3-channel tiny model as checkpoint_1 of `workdir`."""
    import jax

    config = _config(**{"data.dataset": "CIFAR10", "data.num_channels": 3})
    manager, _ = checkpoints.managers(workdir, config)
    state = checkpoints.init_state(config, jax.random.PRNGKey(0), replicated(make_mesh()))
    checkpoints.save(manager, 1, state, "snapshot", 0)


def test_colorize_keeps_the_gray_image(data_dir, tmp_path):
    workdir = str(tmp_path / "colour")
    _colour_checkpoint(workdir)
    folder = tmp_path / "rgb"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 3), dtype=np.uint8)
    for i, image in enumerate(rgb):
        Image.fromarray(image).save(folder / f"c{i}.png")
    # sigma_max 0.05: the untrained network's chroma stays near its prior, mostly unclipped.
    # No corrector: Langevin steps scale with 1 / |score|^2, and the untrained score is ~0.
    run(main_args("colorize", workdir, data_dir, "--config.data.dataset=CIFAR10",
                  "--config.data.num_channels=3", f"--config.controllable.source={folder}",
                  "--config.model.sigma_max=0.05", "--config.sampling.corrector=none", *QUIET))
    out = os.path.join(workdir, "colorize", "ckpt_1")
    np.testing.assert_array_equal(np.load(os.path.join(out, "input.npz"))["samples"], rgb)
    gray = np.load(os.path.join(out, "gray.npz"))["samples"]
    np.testing.assert_array_equal(gray[..., 0], np.round(rgb.mean(-1)).astype(np.uint8))
    result = np.load(os.path.join(out, "result.npz"))["samples"]
    assert result.shape == (3, 28, 28, 3)
    # The colorizer keeps the gray direction: only the chroma is sampled (clipping aside).
    inside = (result > 0).all(-1) & (result < 255).all(-1)
    err = np.abs(result.astype(float).mean(-1) - gray[..., 0])[inside]
    assert inside.mean() > 0.2 and err.max() <= 1.5


# ---------------------------------------------------------------------------- conditional


def test_conditional_samples_the_requested_classes(workdir, data_dir, classifier_runs,
                                                   tmp_path):
    out = str(tmp_path / "conditional")
    run(main_args("conditional", workdir, data_dir, "--config.controllable.labels=0,3,7",
                  "--config.sample.num_samples=6", "--config.controllable.scale=2.0",
                  f"--config.sample.out={out}", *QUIET))
    data = np.load(os.path.join(out, "samples.npz"))
    assert data["samples"].shape == (6, 28, 28, 1) and data["samples"].dtype == np.uint8
    np.testing.assert_array_equal(data["labels"], [0, 3, 7, 0, 3, 7])
    # class_grid.png: a row per class, 2 samples each.
    assert Image.open(os.path.join(out, "class_grid.png")).size == (2 * 30 + 2, 3 * 30 + 2)
    with open(os.path.join(out, "batches", "settings.json")) as f:
        settings = json.load(f)
    assert settings["scale"] == 2.0 and settings["classifier"].endswith("checkpoint_6")
    # Any other sampler of config.sampling runs on the guided score too (3 DDIM steps + the
    # final denoising), in one program.
    out = str(tmp_path / "conditional_ddim")
    proc = run(main_args("conditional", workdir, data_dir, "--config.controllable.labels=5",
                         "--config.sample.num_samples=2", "--config.sampling.method=ddim",
                         "--config.sampling.num_steps=3", f"--config.sample.out={out}", *QUIET))
    data = np.load(os.path.join(out, "samples.npz"))
    assert data["samples"].shape == (2, 28, 28, 1)
    np.testing.assert_array_equal(data["labels"], [5, 5])
    assert "the classifier-guided ddim sampler (batch" in proc.stderr + proc.stdout


# ---------------------------------------------------------------------------- likelihood


def test_likelihood_of_a_folder(workdir, data_dir, png_folder, tmp_path):
    folder, _ = png_folder
    out = str(tmp_path / "bpd")
    proc = run(main_args("likelihood", workdir, data_dir, f"--config.controllable.source={folder}",
                         "--config.eval.bpd_num_repeats=2", "--config.sampling.ode_rtol=1e-3",
                         "--config.sampling.ode_atol=1e-3", f"--config.sample.out={out}",
                         *QUIET))
    data = np.load(os.path.join(out, "bpd.npz"))
    bpd = data["bpd"]
    assert bpd.shape == (5,) and data["bpd_repeats"].shape == (2, 5)
    np.testing.assert_allclose(bpd, data["bpd_repeats"].mean(0), rtol=1e-6)
    assert np.all(np.isfinite(bpd)) and np.all(bpd > 0)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["num_images"] == 5
    assert summary["bpd"] == pytest.approx(bpd.mean(), rel=1e-6)
    assert summary["stderr"] == pytest.approx(bpd.std(ddof=1) / np.sqrt(5), rel=1e-6)
    with open(os.path.join(out, "bpd.csv")) as f:
        rows = f.read().splitlines()
    assert rows[0] == "name,bpd" and rows[1].startswith("img_0.png,") and len(rows) == 6
    assert f"bits/dim: {bpd.mean():.4f} +- " in proc.stdout


# ---------------------------------------------------------------------------- errors


def _npz(path, array):
    np.savez(path, images=array)
    return str(path)


ERRORS = {
    "missing folder": ("inpaint", {"controllable.source": "{tmp}/nowhere"},
                       "{tmp}/nowhere: no such file or folder"),
    "wrong size": ("inpaint", {"controllable.source": "{npz32}"},
                   "the images are 32x32 (HxW) but the model takes 28x28"),
    "wrong channels": ("likelihood", {"controllable.source": "{npz2c}"},
                       "images of shape [3, 28, 28, 2]; expected [N, H, W] or [N, H, W, C]"),
    "unknown mask": ("inpaint", {"controllable.mask": "circle"},
                     "config.controllable.mask='circle'; valid: ['half', 'box', 'random', "
                     "'file']"),
    "label outside classes": ("conditional", {"controllable.labels": "2,10"},
                              "config.controllable.labels='2,10': 10 is not a class; valid: "
                              "0..9"),
    "colorize grey model": ("colorize", {}, "--mode=colorize needs a 3-channel (colour) model, "
                                            "but config.data.num_channels=1"),
    "classifier mismatch": ("conditional", {"classifier.channel_multiplier": 2},
                            "was written for a different config: parameter"),
    "box outside": ("inpaint", {"controllable.mask": "box", "controllable.box": "20,20,10,10"},
                    "config.controllable.box='20,20,10,10' does not lie inside the 28x28"),
}


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_input_fails_with_one_clear_line(case, workdir, data_dir, classifier_runs, tmp_path):
    mode, overrides, expected = ERRORS[case]
    names = {"tmp": str(tmp_path),
             "npz32": _npz(tmp_path / "big.npz", np.zeros((3, 32, 32, 1), np.uint8)),
             "npz2c": _npz(tmp_path / "two.npz", np.zeros((3, 28, 28, 2), np.uint8))}
    overrides = {k: v.format(**names) if isinstance(v, str) else v
                 for k, v in overrides.items()}
    config = _config(**{"data.data_dir": data_dir, **overrides})
    with pytest.raises(run_lib.USAGE_ERRORS) as info:
        run_lib.MODES[mode](config, workdir, "eval")
    message = str(info.value)
    assert expected.format(**names) in message and "\n" not in message, message
    assert not os.path.exists(os.path.join(workdir, mode))


def test_bad_input_through_main_is_one_line_with_exit_code_2(workdir, data_dir, tmp_path):
    proc = run(main_args("inpaint", workdir, data_dir,
                         f"--config.controllable.source={tmp_path}/nowhere"), ok=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert lines[-1].startswith(f"error: {tmp_path}/nowhere: no such file or folder")


# ---------------------------------------------------------------------------- the notebook


def test_demo_notebook_executes_on_the_tiny_checkpoint(workdir, data_dir, classifier_runs,
                                                       monkeypatch):
    """notebooks/demo.ipynb top to bottom (as CI runs it) against the tiny checkpoint."""
    notebook = nbformat.read(os.path.join(ROOT, "notebooks", "demo.ipynb"), as_version=4)
    overrides = {"data.data_dir": data_dir, "sampling.ode_rtol": 1e-3,
                 "sampling.ode_atol": 1e-3}
    for key, value in {"DEMO_WORKDIR": workdir, "DEMO_CONFIG": "configs/tiny_test.py",
                       "DEMO_OVERRIDES": json.dumps(overrides), "DEMO_NUM_SAMPLES": "4",
                       **{k: ENV[k] for k in ("JAX_PLATFORMS", "XLA_FLAGS",
                                              "JAX_COMPILATION_CACHE_DIR")}}.items():
        monkeypatch.setenv(key, value)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": ROOT}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs)
    assert "ncsnpp under vesde: checkpoint_2, step 12" in text
    assert "bits/dim over 4 test images" in text and "columns: T-shirt/top" in text
    assert "encode -> decode: PSNR" in text
    # PC, ODE, inpainting, class-conditional and representations figures, inline.
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 5
    # No false alarms: tqdm's missing-widgets warning, Orbax's read-only notes (issue 26).
    stderr = "".join(o.get("text", "") for o in outputs if o.get("name") == "stderr")
    for alarm in ("IProgress not found", "TqdmWarning", "read only", "read_only"):
        assert alarm not in stderr, stderr[-2000:]
