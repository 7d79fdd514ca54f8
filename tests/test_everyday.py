"""Everyday use (issue 26, items 7 and 10-15): what the log holds, what a run says while it
compiles and samples, batches sized to what is asked, Ctrl-C, sampler folders, nothing written
before the data validates, the benchmark's machine record, the notebook's warnings.

In-process where possible; the end-to-end checks read the runs the session fixtures make.
"""

from __future__ import annotations

import json
import logging as py_logging
import os
import signal
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import logging
from PIL import Image
from run_helpers import ROOT

import run_lib
import sampling
import sde_lib
from configs import tiny_test
from run_lib import generate, interrupt, logs, steps
from run_lib.devices import make_mesh


class _Lines(py_logging.Handler):
    """Collects the messages of absl's logger."""

    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def absl_lines():
    handler = _Lines()
    logger = logging.get_absl_logger()
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(py_logging.INFO)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(old)


def _record(path, level, msg, *args):
    return py_logging.LogRecord("absl", level, path, 1, msg, args, None)


# ---------------------------------------------------------------------------- 7, 12: the log


def test_log_file_filters_like_the_terminal(tmp_path):
    orbax = "/venv/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py"
    ours = os.path.join(ROOT, "run_lib", "training.py")
    records = {
        "project info": _record(ours, py_logging.INFO, "step %d/%d", 2, 6),
        "orbax info": _record(orbax, py_logging.INFO, "Sharding callback duration: 7"),
        "orbax warning": _record(orbax, py_logging.WARNING, "Something went wrong"),
        "read only": _record(orbax, py_logging.WARNING, "Given directory is read only=%s",
                             "/w/checkpoints"),
        "read only option": _record(orbax, py_logging.WARNING,
                                    "CheckpointManagerOptions.read_only=True, setting "
                                    "save_interval_steps=0."),
    }
    expected = {"project info": True, "orbax info": False, "orbax warning": True,
                "read only": False, "read only option": False}
    try:
        for verbose in (False, True):
            logs.install_filter(verbose=verbose)
            handler = logs.log_to_file(str(tmp_path / f"v{verbose}"))
            try:
                terminal = logging.get_absl_handler()
                for name, record in records.items():
                    want = expected[name] or verbose
                    assert bool(handler.filter(record)) == want, (name, verbose)
                    assert bool(terminal.filter(record)) == want, (name, verbose)
                    # The logger itself (a notebook's handlers are not absl's).
                    assert bool(logging.get_absl_logger().filter(record)) == want, name
            finally:
                logging.get_absl_logger().removeHandler(handler)
                handler.close()
    finally:
        logs.install_filter(verbose=False)


def test_training_log_holds_the_projects_lines_only(trained):
    """stdout.txt of the tiny 12-step run: the project's lines (with the compile line), no
    Orbax internals."""
    with open(os.path.join(trained["straight"], "stdout.txt")) as f:
        lines = f.read().splitlines()
    text = "\n".join(lines)
    for internal in ("Sharding callback", "_SignalingThread", "[process=0]", "read only"):
        assert internal not in text
    assert any("step 12/12" in line for line in lines)
    # 6 logged steps, 6 eval losses, 6 meta and 2 snapshot saves, 2 sample grids, and a handful
    # of start and end lines (1,234 lines, 805 of them Orbax's, before).
    assert len(lines) < 60, text
    assert "Compiled the train step" in trained["log"] or \
        "Loaded the train step" in trained["log"]
    assert "Compiling the train step (2 step(s) of batch 8 per call) ..." in trained["log"]


# ---------------------------------------------------------------------------- 10: compiling


def test_compiling_says_what_and_where_it_came_from(absl_lines):
    with logs.compiling("the thing"):
        pass
    with logs.compiling("the cached thing"):
        logs._on_event("/jax/compilation_cache/cache_hits")
    assert absl_lines[0] == "Compiling the thing ..."
    assert absl_lines[1].startswith("Compiled the thing in ")
    assert absl_lines[3].startswith("Loaded the cached thing from the compilation cache in ")
    # A jitted function compiled once per argument signature, with a line each time.
    fn = logs.CompiledOnFirstCall(jax.jit(lambda x: 2 * x), "the doubler")
    np.testing.assert_array_equal(fn(jnp.arange(3.0)), [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(fn(jnp.ones(3)), [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(fn(jnp.ones(2)), [2.0, 2.0])
    assert sum(line.startswith("Compiling the doubler") for line in absl_lines) == 2


def _gaussian_score(sde, mu, s):
    """The exact score of data N(mu, s^2 I) under `sde` (mean m(t) mu, variance m^2 s^2 + std^2)."""

    def score(x, t):
        m, std = sde.marginal_prob(jnp.ones_like(x), t)
        var = m ** 2 * s ** 2 + sde_lib.batch_mul(std, jnp.ones_like(x)) ** 2
        return -(x - m * mu) / var

    return score


@pytest.mark.parametrize("corrector", ["none", "langevin"])
def test_loop_program_in_parts_equals_the_whole_sampler(corrector, absl_lines, monkeypatch):
    """The PC sampler run as LoopProgram parts (progress lines between them) gives the one-call
    sampler's samples; Ctrl-C between parts stops it."""
    sde = sde_lib.VPSDE(N=40)
    shape = (4, 3, 3, 1)
    mu, s = 0.5, 0.3
    rng = jax.random.PRNGKey(7)
    whole, nfe = sampling.get_pc_sampler(sde, shape, "euler_maruyama", corrector, lambda x: x,
                                         snr=0.16)(rng, _gaussian_score(sde, mu, s))
    monkeypatch.setattr(steps, "PROGRESS_SECONDS", 0.0)

    def parts_of(batch):
        return sampling.get_pc_loop_parts(sde, (batch, *shape[1:]), "euler_maruyama",
                                          corrector, lambda x: x, snr=0.16)

    program = steps.LoopProgram(parts_of, lambda mu: _gaussian_score(sde, mu, s), make_mesh(),
                                "the test sampler", calls=6)
    parts = program(rng, shape[0], (jnp.float32(mu),))
    np.testing.assert_allclose(np.asarray(parts), np.asarray(whole), rtol=1e-5, atol=1e-5)
    assert parts_of(4).nfe == nfe == 40 * (1 + (corrector == "langevin"))
    # The exact answer: samples of N(mu, s^2) (denoised mean at eps; 4x9 values).
    assert abs(float(np.mean(parts)) - mu) < 3 * s / 6 + 0.05
    progress = [line for line in absl_lines if line.startswith("the test sampler: step ")]
    assert [line.split()[4].rstrip(",") for line in progress] == ["7/40", "13/40", "20/40", "27/40",
                                                      "33/40"]
    assert any(line.startswith("Compiling the test sampler (40 steps, batch 4)")
               for line in absl_lines)
    # Ctrl-C (the first one: a request) stops the loop after the part that runs.
    interrupt._requested.set()
    try:
        with pytest.raises(interrupt.Interrupted, match="Interrupted at step 7 of 40"):
            program(rng, shape[0], (jnp.float32(mu),))
    finally:
        interrupt._requested.clear()


# ---------------------------------------------------------------------------- 11: sizes, Ctrl-C


def test_batches_hold_what_is_needed_and_short_batches_are_redone(tmp_path):
    assert generate.batch_sizes(30, 64) == [30]
    assert generate.batch_sizes(20, 8) == [8, 8, 4]
    assert generate.batch_sizes(16, 8) == [8, 8]
    assert generate.computed_size(5) % jax.device_count() == 0 and \
        0 <= generate.computed_size(5) - 5 < jax.device_count()
    calls = []

    def produce(i, sizes):
        calls.append((i, sizes[i]))
        return {"x": np.full((sizes[i], 2), i, np.int32)}

    folder = str(tmp_path)
    sizes = generate.batch_sizes(10, 8)
    out = generate.run_batches(folder, len(sizes), lambda i: produce(i, sizes), {"s": 1}, "t",
                               show_progress=False, sizes=sizes)
    assert out["x"].shape == (10, 2) and calls == [(0, 8), (1, 2)]
    # Asking for more later: the short batch 1 is made again at full size, batch 0 is kept.
    sizes = generate.batch_sizes(20, 8)
    out = generate.run_batches(folder, len(sizes), lambda i: produce(i, sizes), {"s": 1}, "t",
                               show_progress=False, sizes=sizes)
    assert out["x"].shape == (20, 2) and calls[2:] == [(1, 8), (2, 4)]
    np.testing.assert_array_equal(out["x"][:, 0], [0] * 8 + [1] * 8 + [2] * 4)


def test_conditional_and_sample_compute_only_the_samples_asked_for(monkeypatch, tmp_path):
    """A 30-sample request at batch 64 computes one batch of 30 (not 64); 70 computes 64 + 6."""
    shapes = []

    def fake_sample_fn(config, sde, model, shape, mesh):
        shapes.append(shape[0])
        return lambda rng, params, model_state: (jnp.full(shape, 0.5), 1)

    class FakeRun:
        def __init__(self, config, workdir, mode):
            self.config, self.batch_size, self.folder = config, 64, str(tmp_path / mode)
            self.sde = self.model = self.mesh = None
            self.state = type("S", (), {"params_ema": None, "model_state": None})()

        sizes, computed_size = generate.Run.sizes, generate.Run.computed_size
        batch_key = generate.Run.batch_key
        key = jax.random.PRNGKey(0)

        def settings(self, **extra):
            return {"n": 1, **extra}

        def run_batches(self, *args, **kwargs):
            return generate.run_batches(self.folder, *args, show_progress=False, **kwargs)

    monkeypatch.setattr(generate, "Run", FakeRun)
    monkeypatch.setattr(generate, "get_sample_fn", fake_sample_fn)
    monkeypatch.setattr(generate, "prepare", lambda config, mode, workdir=None: config)
    config = tiny_test.get_config()
    config.sample.num_samples = 30
    folder = generate.sample(config, str(tmp_path))
    assert shapes == [30]
    assert np.load(os.path.join(folder, "samples.npz"))["samples"].shape == (30, 28, 28, 1)
    config.sample.num_samples = 70
    generate.sample(config, str(tmp_path))
    assert shapes == [30, 64, 6]


@pytest.fixture
def clean_interrupt():
    yield
    interrupt._requested.clear()


def test_first_ctrl_c_is_acknowledged_during_a_long_compiled_call(capfd, clean_interrupt):
    """Python's handler waits for the compiled call to return; the acknowledgement does not."""
    f = jax.jit(lambda x, n: jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(y @ y), x))
    x = jnp.full((256, 256), 1e-3)
    f(x, 1).block_until_ready()  # compiled before timing
    n = 50
    while True:  # a call of about 4 s on this machine
        t0 = time.time()
        f(x, n).block_until_ready()
        if time.time() - t0 >= 1.0:
            n = int(n * 4.0 / (time.time() - t0)) + 1
            break
        n *= 4
    acknowledged = []

    def watch():
        while not interrupt._acknowledged.wait(0.01):
            pass
        acknowledged.append(time.time())

    with interrupt.graceful_sigint():
        threading.Thread(target=watch, daemon=True).start()
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        t0 = time.time()
        np.asarray(f(x, n))
        end = time.time()
        time.sleep(0.05)
        assert interrupt.interrupted()
    assert end - t0 > 1.5
    assert acknowledged and acknowledged[0] - t0 < 1.0 < end - t0
    err = capfd.readouterr().err
    assert err.count("Ctrl-C: stopping at the next safe point") == 1
    # A second Ctrl-C ends the process at once (exit 130): tested in a subprocess by
    # tests/test_reliability.py::test_second_ctrl_c_stops_at_once_even_inside_a_long_call.


def test_quickstart_likelihood_defaults_to_one_draw():
    from configs.vp import fashion_mnist_ddpmpp_quickstart

    assert fashion_mnist_ddpmpp_quickstart.get_config().eval.bpd_num_repeats == 1


# ---------------------------------------------------------------------------- 13: folders


def test_each_sampler_setting_gets_its_own_folder(tmp_path):
    config = tiny_test.get_config()
    workdir = str(tmp_path)
    run_lib.files.save_config(config, workdir)
    default = os.path.join(workdir, "sample", "ckpt_2")
    other = config.copy_and_resolve_references()
    other.sampling.method, other.sampling.num_steps, other.sampling.order = "dpm_solver", 19, 2
    em = config.copy_and_resolve_references()
    em.sampling.predictor, em.sampling.corrector = "euler_maruyama", "none"
    fewer = config.copy_and_resolve_references()
    fewer.model.num_scales = 2
    unipc = config.copy_and_resolve_references()
    unipc.sampling.method, unipc.sampling.num_steps, unipc.sampling.order = "unipc", 10, 3

    def sample_into(c):
        folder = generate.output_folder(c, workdir, "sample", 2)
        generate.run_batches(folder, 1, lambda i: {"x": np.zeros((1, 1))},
                             {"sampler": generate.sampler_tag(c), "N": c.model.num_scales},
                             "t", show_progress=False)
        return folder

    # The README's comparison, one run after another: the first sampler takes
    # sample/ckpt_<k>/ (where samples.npz is documented), each other one a folder named after
    # it, and a sampler run again finds its own folder; no folder holds another's batches.
    assert sample_into(other) == default
    assert sample_into(config) == os.path.join(default, "reverse_diffusion_langevin_4_snr0.16_x1")
    assert sample_into(em) == os.path.join(default, "euler_maruyama_none_4")
    assert sample_into(fewer).endswith("reverse_diffusion_langevin_2_snr0.16_x1")
    assert sample_into(unipc) == os.path.join(default, "unipc_10_order3_bh2")
    assert sample_into(config) == os.path.join(default, "reverse_diffusion_langevin_4_snr0.16_x1")
    assert sample_into(other) == default
    # Other modes, and an explicit sample.out, are unchanged.
    assert generate.output_folder(other, workdir, "inpaint", 2) == os.path.join(
        workdir, "inpaint", "ckpt_2")
    other.sample.out = "mine"
    assert generate.output_folder(other, workdir, "sample", 2) == os.path.join(workdir, "mine")
    # On a checkpoint not sampled yet, any sampler writes to sample/ckpt_<k>/.
    assert generate.output_folder(em, workdir, "sample", 1).endswith(os.path.join("sample",
                                                                                  "ckpt_1"))


# ---------------------------------------------------------------------------- 14: data first


def test_a_data_error_leaves_no_workdir_behind(tmp_path):
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((28, 28), np.uint8)).save(pngs / f"{i}.png")
    config = tiny_test.get_config()
    config.data.data_dir = str(pngs)
    workdir = tmp_path / "new" / "run"
    with pytest.raises(run_lib.USAGE_ERRORS) as info:
        run_lib.train(config, str(workdir))
    assert str(pngs) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------------------- 15: the machine


def test_benchmark_records_the_machine(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import compare_pytorch
    finally:
        sys.path.pop(0)
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n"
                       "flags\t\t: fpu sse2 avx avx2 fma bmi2\n\nprocessor\t: 1\n"
                       "model name\t: AMD EPYC 7B13 64-Core Processor\n")
    summary = compare_pytorch.machine_summary(str(cpuinfo))
    assert summary["cpu"] == "AMD EPYC 7B13 64-Core Processor"
    assert summary["vector"] == ["avx", "avx2", "fma"]
    line = compare_pytorch.machine_line(summary)
    assert "AMD EPYC 7B13" in line and "no AVX-512 (avx, avx2, fma)" in line
    summary["vector"] += ["avx512f"]
    assert ", AVX-512 (" in compare_pytorch.machine_line(summary)
    # This machine's own record names a CPU.
    assert compare_pytorch.machine_summary()["cpus"] == os.cpu_count()


def test_readme_names_the_machine_of_its_figures():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = " ".join(f.read().split())
    assert "AMD EPYC, KVM; AVX2 and AVX-512 with VNNI and BF16" in text
    assert "512 samples took 895 s on an idle AMD EPYC with AVX2 only" in text
    assert "**0.95 / 0.91**" in text


# ---------------------------------------------------------------------------- 12: the notebook


def test_notebook_silences_tqdm_and_orbax_warnings():
    with open(os.path.join(ROOT, "notebooks", "demo.ipynb")) as f:
        notebook = json.load(f)
    setup = "".join(notebook["cells"][1]["source"])
    assert 'warnings.filterwarnings("ignore", message="IProgress not found"' in setup
    imports = "".join(notebook["cells"][2]["source"])
    assert "logs.install_filter()" in imports
