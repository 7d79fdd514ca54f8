"""End-to-end runs of main.py on the tiny config: train, kill and resume, evaluate, scale out.

The runs are subprocesses (as a user would start them), on a tiny Fashion-MNIST subset that
the tests write as IDX files, so each run takes seconds after compilation.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from run_helpers import ENV, FASHION, ROOT, TRAIN, assert_trees_equal, meta_steps, restore_tree
from run_helpers import main_args as _main_args
from run_helpers import run as _run

import run_lib
from configs import tiny_test

_meta_steps = meta_steps


def test_training_writes_documented_files(trained):
    workdir = trained["straight"]
    with open(os.path.join(workdir, "config.json")) as f:
        saved = json.load(f)
    assert saved["training"]["n_iters"] == 12 and saved["model"]["name"] == "ncsnpp"
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [
        "checkpoint_1", "checkpoint_2"]
    # The two newest preemption checkpoints are kept, so a damaged one has a fallback.
    assert _meta_steps(workdir) == [10, 12]
    for step in (6, 12):
        folder = os.path.join(workdir, "samples", f"iter_{step}")
        samples = np.load(os.path.join(folder, "sample.npz"))["samples"]
        assert samples.shape == (8, 28, 28, 1) and samples.dtype == np.uint8
        assert os.path.getsize(os.path.join(folder, "sample.png")) > 0
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    assert "steps/s" in trained["log"] and "ETA" in trained["log"]


def test_killed_and_resumed_training_is_bit_exact(trained):
    assert 4 <= trained["killed_at"] < 12
    a = restore_tree(os.path.join(trained["straight"], "checkpoints", "checkpoint_2"))
    b = restore_tree(os.path.join(trained["killed"], "checkpoints", "checkpoint_2"))
    assert int(a["step"]) == int(b["step"]) == 12
    assert_trees_equal(a, b)


def test_restart_after_finish_does_nothing_and_keeps_checkpoints(trained, data_dir):
    workdir = trained["straight"]
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    proc = _run(_main_args("train", workdir, data_dir, *TRAIN))
    assert "nothing to do" in proc.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_non_finite_loss_stops_without_touching_checkpoints(trained, data_dir, tmp_path):
    import shutil

    workdir = str(tmp_path / "copy")
    shutil.copytree(trained["straight"], workdir)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    # An absurd learning rate blows the parameters up on the first resumed step.
    args = _main_args("train", workdir, data_dir, *TRAIN[1:], "--config.training.n_iters=16",
                      "--config.optim.lr=1e30", "--config.training.snapshot_sampling=False")
    proc = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "Non-finite training loss" in proc.stderr and "step 14" in proc.stderr
    assert _meta_steps(workdir) == [10, 12]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A pytorch-fid-layout weight file with random values, written without PyTorch."""
    import torch_pickle_writer

    import evaluation

    path = str(tmp_path_factory.mktemp("inception") / "pt_inception-random.pth")
    sd = torch_pickle_writer.flax_to_torch_state_dict(evaluation.init_random_variables(seed=0))
    torch_pickle_writer.save_torch_state_dict(path, sd)
    return path


EVAL = ("--config.eval.enable_sampling=True", "--config.eval.enable_bpd=True",
        "--config.eval.enable_loss=True", "--config.eval.num_bpd_batches=1",
        "--config.eval.bpd_num_repeats=1", "--config.eval.begin_ckpt=2",
        "--config.eval.end_ckpt=2", "--config.eval.num_samples=16",
        "--config.eval.ckpt_wait_secs=5", "--config.eval.show_progress=False")


def test_fid_stats_then_eval_writes_files_and_resumes(trained, data_dir, inception_weights,
                                                      tmp_path):
    workdir = trained["straight"]
    stats_dir = str(tmp_path / "stats")
    common = (f"--config.eval.inception_weights={inception_weights}",
              f"--config.eval.stats_dir={stats_dir}")
    _run(_main_args("fid_stats", workdir, data_dir, *common))
    stats = np.load(os.path.join(stats_dir, "fashionmnist_stats.npz"))["pool_3"]
    assert stats.shape == (64, 2048) and np.all(np.isfinite(stats))

    _run(_main_args("eval", workdir, data_dir, *common, *EVAL, "--eval_folder=eval_a"))
    eval_a = os.path.join(workdir, "eval_a")
    for name in ("ckpt_2_loss.npz", "ckpt_2_bpd.npz", "report_2.npz", "summary.json",
                 "ckpt_2/samples_0.npz", "ckpt_2/samples_1.npz", "ckpt_2/statistics_0.npz",
                 "ckpt_2/statistics_1.npz"):
        assert os.path.exists(os.path.join(eval_a, name)), name
    with open(os.path.join(eval_a, "summary.json")) as f:
        summary = json.load(f)["2"]
    assert summary["step"] == 12 and summary["num_samples"] == 16
    for key in ("loss", "bpd", "IS", "FID", "KID"):
        assert np.isfinite(summary[key]), key
    assert summary["bpd"] > 0 and summary["IS"] >= 1.0 and summary["FID"] > 0
    stats0 = np.load(os.path.join(eval_a, "ckpt_2", "statistics_0.npz"))
    assert stats0["pool_3"].shape == (8, 2048) and stats0["logits"].shape == (8, 1008)

    # Kill an evaluation after its first sampling round; the resumed one must agree exactly.
    eval_b = os.path.join(workdir, "eval_b")
    victim = subprocess.Popen(_main_args("eval", workdir, data_dir, *common, *EVAL,
                                         "--eval_folder=eval_b"),
                              cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    first_round = os.path.join(eval_b, "ckpt_2", "statistics_0.npz")
    deadline = time.time() + 900
    while not os.path.exists(first_round) and victim.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    _run(_main_args("eval", workdir, data_dir, *common, *EVAL, "--eval_folder=eval_b"))
    report_a = np.load(os.path.join(eval_a, "report_2.npz"))
    report_b = np.load(os.path.join(eval_b, "report_2.npz"))
    for key in ("IS", "fid", "kid"):
        assert float(report_a[key]) == float(report_b[key]), key
    for r in range(2):
        np.testing.assert_array_equal(
            np.load(os.path.join(eval_a, "ckpt_2", f"samples_{r}.npz"))["samples"],
            np.load(os.path.join(eval_b, "ckpt_2", f"samples_{r}.npz"))["samples"])


def test_eval_without_stats_fails_clearly(trained, data_dir, tmp_path):
    args = _main_args("eval", trained["straight"], data_dir, *EVAL,
                      f"--config.eval.stats_dir={tmp_path}")
    proc = subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "--mode=fid_stats" in proc.stderr and "fashionmnist_stats.npz" in proc.stderr


def test_bad_values_fail_before_compiling(tmp_path):
    workdir = str(tmp_path / "w")
    proc = subprocess.run(_main_args("train", workdir, FASHION,
                                     "--config.training.sde=vpsd",
                                     "--config.sampling.predictor=euler"),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "config.training.sde='vpsd'; valid: ['vesde', 'vpsde', 'subvpsde']" in proc.stderr
    assert "Unknown predictor 'euler'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
    proc = subprocess.run(_main_args("sampel", workdir, FASHION), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and ("train|eval|fid_stats|sample|inpaint|colorize|"
                                     "train_classifier|conditional|likelihood|import|"
                                     "export") in proc.stderr
    proc = subprocess.run(_main_args("train", workdir, FASHION, "--config.training.nitters=3"),
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "nitters" in proc.stderr


def test_validate_config_lists_every_problem(monkeypatch):
    config = tiny_test.get_config()
    config.unlock()
    config.model.name = "unet"
    config.data.dataset = "ImageNet"
    config.training.log_freq = 3
    with pytest.raises(run_lib.ConfigError) as err:
        run_lib.validate_config(config)
    message = str(err.value)
    assert "Unknown model 'unet'; valid names" in message
    assert "config.data.dataset='ImageNet'; valid:" in message
    assert "config.training.log_freq=3 must be a positive multiple" in message
    import jax

    config = tiny_test.get_config()
    monkeypatch.setattr(jax, "device_count", lambda: 3)
    with pytest.raises(run_lib.ConfigError, match="batch_size=8 must be a positive multiple "
                                                  "of the device count 3"):
        run_lib.validate_config(config)


def _worker(mode, *args, devices=None):
    env = dict(ENV)
    if devices:
        env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "distributed_worker.py"),
                             mode, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc):
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-4000:]
    line = [x for x in out.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_sharded_steps_agree_across_devices_and_processes():
    port = _free_port()
    procs = {
        "four": _worker("single", devices=4),
        "one": _worker("one_device", devices=4),
        "p0": _worker("multi", f"localhost:{port}", "2", "0"),
        "p1": _worker("multi", f"localhost:{port}", "2", "1"),
    }
    results = {name: _result(proc) for name, proc in procs.items()}
    assert results["four"]["devices"] == 4 and results["one"]["devices"] == 4
    assert results["p0"]["processes"] == results["p1"]["processes"] == 2
    assert results["p0"]["devices"] == 2
    # Two processes hold the same replicated state, bit for bit.
    assert results["p0"]["param_sums"] == results["p1"]["param_sums"]
    assert results["p0"]["losses"] == results["p1"]["losses"]
    # 4 devices, 2 processes and 1 device train on the same global batches: same numbers up
    # to the order of floating-point reductions.
    reference = results["one"]
    for name in ("four", "p0"):
        got = results[name]
        assert got["step"] == reference["step"] == 6
        np.testing.assert_allclose(got["losses"], reference["losses"], rtol=2e-5)
        np.testing.assert_allclose(got["eval_loss"], reference["eval_loss"], rtol=2e-5)
        # atol: the zero-initialized output layers sum to ~1e-9
        np.testing.assert_allclose(got["param_sums"], reference["param_sums"], rtol=1e-5,
                                   atol=1e-7)
        np.testing.assert_allclose(got["first_leaf"], reference["first_leaf"], rtol=1e-4,
                                   atol=1e-6)


def test_multistep_sampler_orders_and_unipc_variant_are_validated():
    config = tiny_test.get_config()
    for method, bad, valid in (("unipc", 4, [1, 2, 3]), ("ipndm", 5, [1, 2, 3, 4]),
                               ("sde_dpm_solver", 3, [1, 2])):
        config.sampling.method, config.sampling.order = method, bad
        with pytest.raises(run_lib.ConfigError) as err:
            run_lib.validate_config(config, "eval")
        assert f"config.sampling.order={bad}; valid: {valid} for method {method!r}" in str(
            err.value)
    config.sampling.method, config.sampling.order = "unipc", 3
    config.sampling.unipc_variant = "bh3"
    with pytest.raises(run_lib.ConfigError, match=r"config.sampling.unipc_variant='bh3'; "
                                                  r"valid: \['bh1', 'bh2'\]"):
        run_lib.validate_config(config, "eval")
    config.sampling.unipc_variant = "bh2"
    config.sampling.thresholding = "percentile"
    with pytest.raises(run_lib.ConfigError, match=r"config.sampling.thresholding: Unknown x0 "
                                                  r"thresholding 'percentile'; valid: "):
        run_lib.validate_config(config, "eval")
    config.sampling.thresholding, config.sampling.threshold_percentile = "dynamic", 1.5
    with pytest.raises(run_lib.ConfigError, match=r"percentile must lie in \(0, 1\], got 1.5"):
        run_lib.validate_config(config, "eval")


def test_learning_rate_decay_is_validated():
    config = tiny_test.get_config()
    config.optim.lr_decay = "linear"
    with pytest.raises(run_lib.ConfigError, match=r"config.optim.lr_decay='linear'; valid: "
                                                  r"\['none', 'cosine'\]"):
        run_lib.validate_config(config, "train")
    config.optim.lr_decay, config.optim.warmup, config.training.n_iters = "cosine", 100, 100
    with pytest.raises(run_lib.ConfigError, match=r"ends at training.n_iters=100, which must "
                                                  r"exceed optim.warmup=100"):
        run_lib.validate_config(config, "train")
    config.training.n_iters = 101
    run_lib.validate_config(config, "train")
    config.classifier.lr_decay, config.classifier.warmup = "cosine", config.classifier.n_iters
    with pytest.raises(run_lib.ConfigError, match=r"config.classifier.lr_decay='cosine' ends at "
                                                  r"classifier.n_iters="):
        run_lib.validate_config(config, "train_classifier")
    config.classifier.lr_decay, config.classifier.label_smoothing = "none", 1.0
    with pytest.raises(run_lib.ConfigError, match=r"config.classifier.label_smoothing=1.0 must "
                                                  r"lie in \[0, 1\)"):
        run_lib.validate_config(config, "train_classifier")


def test_few_step_sampler_settings_are_validated_then_sample_through_run_lib():
    config = tiny_test.get_config()
    config.sampling.method = "dpm_solver"
    config.sampling.order = 4
    config.sampling.num_steps = 0
    config.sampling.schedule = "cosine"
    with pytest.raises(run_lib.ConfigError) as err:
        run_lib.validate_config(config, "eval")
    message = str(err.value)
    assert "config.sampling.order=4; valid: [1, 2, 3]" in message
    assert "config.sampling.num_steps=0 must be an integer >= 1" in message
    assert "Unknown time schedule 'cosine'; valid: ['logsnr'" in message
    config.sampling.order, config.sampling.num_steps, config.sampling.schedule = 3, 3, "default"
    run_lib.validate_config(config, "eval")
    # The program --mode=eval and the snapshot grids run, on an untrained tiny network.
    import jax

    from models import utils as mutils
    from run_lib import steps

    sde, model = steps.build(config)
    _, model_state, params = mutils.init_model(jax.random.key(0), config)
    sample = steps.get_sample_fn(config, sde, model, (2, 28, 28, 1), run_lib.make_mesh())
    images, nfe = sample(jax.random.key(1), params, model_state)
    assert images.shape == (2, 28, 28, 1) and int(nfe) == 3 + config.sampling.noise_removal
    assert np.all(np.isfinite(np.asarray(images)))
    # A score built from other (traced) arguments, e.g. --mode=conditional's guided score:
    # with the network's score scaled by 1 it draws the same images, scaled by 0 others: the
    # factor is an input of the one compiled program, not a baked-in constant.
    from run_lib import build

    def score_of(params, model_state, factor, any_time):
        score_fn = build.get_score_fn(config, sde, model, params, model_state, any_time)
        return lambda x, t: factor * score_fn(x, t)

    scaled = build.get_sample_fn(config, sde, model, (2, 28, 28, 1), run_lib.make_mesh(),
                                 score_of=score_of)
    mesh = run_lib.make_mesh()
    one, zero = (jax.device_put(np.float32(v), run_lib.devices.replicated(mesh)) for v in (1, 0))
    same, _ = scaled(jax.random.key(1), params, model_state, one)
    np.testing.assert_allclose(np.asarray(same), np.asarray(images), atol=1e-6)
    other, _ = scaled(jax.random.key(1), params, model_state, zero)
    assert np.abs(np.asarray(other) - np.asarray(images)).max() > 1e-3
