"""Faults a run must survive without losing or corrupting results, and the one line each bad
input gets instead of a traceback.

Kills inside narrow windows (mid-save) are reached through run_lib.faults: the environment
variable SCORE_SDE_KILL_AT names a point and a step, and the run SIGKILLs itself there.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
from run_helpers import (
    ENV,
    TRAIN,
    assert_trees_equal,
    main_args,
    meta_steps,
    restore_tree,
    run,
    start,
)

from configs import tiny_test

# 20 kill points covering every save phase, in the order a run reaches them (step, phase), so
# that each restart gets past the previous point. `.during` points kill while the phase's
# temporary files exist (inside the write); catch-up at restart re-enters the snapshot and
# sample phases of a step whose save was interrupted.
KILL_POINTS = [
    "config.write@*", "data_state.before@2", "data_state.during@2", "data_state.written@2",
    "meta.before@2", "meta.during@2", "meta.manifest@2", "meta.after@4",
    "data_state.during@6", "meta.during@6", "snapshot.before@6", "snapshot.during@6",
    "snapshot.manifest@6", "samples.before@6", "samples.during@6", "meta.write@8",
    "meta.during@10", "snapshot.during@12", "samples.during@12", "samples.before@12",
]


def test_kill_anywhere_resumes_bit_exact_with_every_scheduled_file(trained, data_dir, tmp_path):
    workdir = str(tmp_path / "victim")
    held = 0
    for point in KILL_POINTS:
        env = {**ENV, "SCORE_SDE_KILL_AT": point}
        proc = run(main_args("train", workdir, data_dir, *TRAIN), ok=False, env=env)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-3000:])
        held += 1
    run(main_args("train", workdir, data_dir, *TRAIN))
    assert held == len(KILL_POINTS) == 20
    straight = trained["straight"]
    for k in (1, 2):
        assert_trees_equal(
            restore_tree(os.path.join(straight, "checkpoints", f"checkpoint_{k}")),
            restore_tree(os.path.join(workdir, "checkpoints", f"checkpoint_{k}")))
    for step in (6, 12):
        for name in ("sample.png", "sample.npz"):
            assert os.path.exists(os.path.join(workdir, "samples", f"iter_{step}", name))
        np.testing.assert_array_equal(
            np.load(os.path.join(straight, "samples", f"iter_{step}", "sample.npz"))["samples"],
            np.load(os.path.join(workdir, "samples", f"iter_{step}", "sample.npz"))["samples"])
    leftovers = [d for d in _walk_names(workdir) if "tmp" in d]
    assert not leftovers, leftovers


def _walk_names(folder):
    for root, dirs, names in os.walk(folder):
        yield from (os.path.relpath(os.path.join(root, n), folder) for n in dirs + names)


def _garble(path, n=400):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2 - n // 2)
        f.write(bytes(np.random.RandomState(0).randint(0, 256, n, dtype=np.uint8)))


def _largest_array_file(folder):
    files = [os.path.join(r, n) for r, _, ns in os.walk(folder) for n in ns if "/d/" in
             os.path.join(r, n)]
    return max(files, key=os.path.getsize)


def test_garbled_meta_checkpoint_falls_back_to_an_older_one(trained, data_dir, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(trained["straight"], workdir)
    bad = _largest_array_file(os.path.join(workdir, "checkpoints-meta", "12"))
    _garble(bad)
    # Training 2 more steps from the fallback (step 10) must equal the straight run at 12.
    args = [a for a in main_args("train", workdir, data_dir, *TRAIN)
            if "snapshot_sampling" not in a] + ["--config.training.snapshot_sampling=False"]
    proc = run(args)
    assert os.path.relpath(bad, workdir) in proc.stderr and "Falling back" in proc.stderr
    assert "Resumed from" in proc.stderr and "at step 10" in proc.stderr
    assert_trees_equal(restore_tree(os.path.join(trained["straight"], "checkpoints-meta", "12")),
                       restore_tree(os.path.join(workdir, "checkpoints-meta", "12")))


def test_garbled_snapshot_is_refused_by_eval_naming_the_file(trained, data_dir, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(trained["straight"], workdir)
    bad = _largest_array_file(os.path.join(workdir, "checkpoints", "checkpoint_2"))
    _garble(bad)
    proc = run(main_args("eval", workdir, data_dir, "--config.eval.begin_ckpt=2",
                         "--config.eval.end_ckpt=2", "--config.eval.enable_loss=True"), ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert bad in proc.stderr and "damaged" in proc.stderr


def test_final_step_is_snapshotted_without_collision(data_dir, tmp_path):
    workdir = str(tmp_path / "w")
    common = ("--config.training.snapshot_freq=4", "--config.training.snapshot_freq_for_"
              "preemption=2", "--config.training.snapshot_sampling=False")
    run(main_args("train", workdir, data_dir, "--config.training.n_iters=6", *common))
    snapshots = os.path.join(workdir, "checkpoints")
    assert sorted(os.listdir(snapshots)) == ["checkpoint_1", "checkpoint_2"]
    assert int(restore_tree(os.path.join(snapshots, "checkpoint_2"))["step"]) == 6
    # Training on to step 8 keeps the end of run 1 (evaluated results of ckpt 2 stay true) and
    # puts step 8 in the next free slot, saying so.
    proc = run(main_args("train", workdir, data_dir, "--config.training.n_iters=8", *common))
    assert ("checkpoint_2 holds step 6 (the end of an earlier run) and is kept; step 8 is saved "
            "as checkpoint_3.") in proc.stderr
    assert sorted(os.listdir(snapshots)) == ["checkpoint_1", "checkpoint_2", "checkpoint_3"]
    assert int(restore_tree(os.path.join(snapshots, "checkpoint_2"))["step"]) == 6
    assert int(restore_tree(os.path.join(snapshots, "checkpoint_3"))["step"]) == 8


def test_mismatched_checkpoint_names_the_parameter_and_keeps_the_config(trained, data_dir,
                                                                         tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(trained["straight"], workdir)
    with open(os.path.join(workdir, "config.json")) as f:
        before = f.read()
    proc = run(main_args("train", workdir, data_dir, *TRAIN, "--config.model.nf=16"), ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "written for a different config" in proc.stderr
    assert "damaged" not in proc.stderr and "move" not in proc.stderr
    assert re.search(r"parameter 'params\.[^']+' has shape \(\d[^)]*\) in the checkpoint but "
                     r"\(\d[^)]*\) in this config", proc.stderr), proc.stderr[-2000:]
    with open(os.path.join(workdir, "config.json")) as f:
        assert f.read() == before


def test_changed_config_keeps_the_earlier_one(trained, data_dir, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(trained["straight"], workdir)
    run(main_args("train", workdir, data_dir, *TRAIN[1:], "--config.training.n_iters=14",
                  "--config.training.snapshot_sampling=False"))
    kept = [n for n in os.listdir(workdir) if n.startswith("config.") and n != "config.json"]
    assert len(kept) == 1
    with open(os.path.join(workdir, kept[0])) as f:
        assert json.load(f)["training"]["n_iters"] == 12
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["training"]["n_iters"] == 14


def test_disk_full_names_the_path_and_damages_nothing(trained, data_dir, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(trained["straight"], workdir)
    env = {**ENV, "SCORE_SDE_FAIL_AT": "meta.write@14=ENOSPC"}
    proc = run(main_args("train", workdir, data_dir, *TRAIN[1:], "--config.training.n_iters=14",
                         "--config.training.snapshot_sampling=False"), ok=False, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: Disk full") and "checkpoints-meta" in line and "MiB" in line
    assert meta_steps(workdir) == [10, 12]
    assert_trees_equal(restore_tree(os.path.join(trained["straight"], "checkpoints-meta", "12")),
                       restore_tree(os.path.join(workdir, "checkpoints-meta", "12")))


def test_ctrl_c_stops_at_a_safe_point_with_one_line(data_dir, tmp_path):
    workdir = str(tmp_path / "w")
    proc = start(main_args("train", workdir, data_dir, "--config.training.n_iters=100000",
                           "--config.training.snapshot_sampling=False"),
                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 600
        while not meta_steps(workdir):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.05)
        seen = meta_steps(workdir)[-1]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    # The next safe point, counted in steps rather than seconds (a loaded CI host stretches
    # the seconds): the loop checks between calls of n_jitted_steps steps, so the run stops
    # within the call under way when the signal lands, or the next if the poll above was late.
    per_call = tiny_test.get_config().training.n_jitted_steps
    last = err.strip().splitlines()[-1]
    stopped = int(re.search(r"Interrupted at step (\d+);", last).group(1))
    assert seen <= stopped <= seen + 2 * per_call, (seen, last)
    assert not [d for d in _walk_names(workdir) if "tmp" in d]
    newest = os.path.join(workdir, "checkpoints-meta", str(meta_steps(workdir)[-1]))
    assert int(restore_tree(newest)["step"]) == meta_steps(workdir)[-1]


def test_eval_of_a_workdir_without_checkpoints_fails_at_once(data_dir, tmp_path):
    missing = str(tmp_path / "typo")
    t0 = time.time()
    proc = run(main_args("eval", missing, data_dir), ok=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    assert not os.path.exists(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run(main_args("eval", str(empty), data_dir, "--config.eval.enable_loss=True"),
               ok=False)
    assert proc.returncode == 2 and "no training run is writing" in proc.stderr
    assert time.time() - t0 < 300 and os.listdir(empty) == []


# One line through main.py for each class of bad input: (overrides, expected text).
BAD_INPUT = {
    "misspelled key": (["--config.training.nitters=3"], "unknown config key 'nitters'"),
    "missing config file": (["--config=configs/nonexistent.py"], "nonexistent.py"),
    "num_scales=0": (["--config.model.num_scales=0"], "num_scales=0 must be >= 1"),
    "sigma_min > sigma_max": (["--config.model.sigma_min=60"], "0 < sigma_min < sigma_max"),
    "wrong channels": (["--config.data.num_channels=3"], "num_channels=3"),
    "image size": (["--config.data.image_size=27"], "image_size=27"),
    "unknown predictor": (["--config.sampling.predictor=euler"], "Unknown predictor 'euler'"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_gets_one_line_and_exit_code_2(case, data_dir, tmp_path):
    overrides, expected = BAD_INPUT[case]
    workdir = str(tmp_path / "w")
    config = [o for o in overrides if o.startswith("--config=")]
    args = main_args("train", workdir, data_dir, *[o for o in overrides if o not in config])
    if config:  # --config must come before its overrides
        args = [config[0] if a.startswith("--config=") else a for a in args]
    proc = run(args, ok=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and expected in proc.stderr, proc.stderr[-2000:]
    assert lines[-1].startswith("error:") or "Invalid config" in proc.stderr
    assert not os.path.exists(workdir)


def test_config_syntax_error_names_file_and_line(data_dir, tmp_path):
    bad = tmp_path / "bad_config.py"
    bad.write_text("def get_config():\n    return (\n\n")
    args = [a for a in main_args("train", str(tmp_path / "w"), data_dir)
            if not a.startswith("--config=")] + [f"--config={bad}"]
    proc = run(args, ok=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert str(bad) in proc.stderr and "line" in proc.stderr


def test_workdir_that_is_a_file_or_read_only(data_dir, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    proc = run(main_args("train", str(a_file), data_dir), ok=False)
    assert proc.returncode == 2 and "is a file" in proc.stderr
    # An immutable folder is read-only even for root (who passes every permission check).
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not permitted here; cannot make a read-only folder")
    try:
        proc = run(main_args("train", str(locked / "w"), data_dir), ok=False)
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"{locked} is read-only" in proc.stderr


def test_default_log_shows_project_lines_not_library_chatter(trained):
    log = trained["log"]
    assert "steps/s" in log and "Saved" in log and "parameters" in log
    for noise in ("CheckpointManagerOptions", "handler", "Finalize"):
        assert noise not in log, noise


def test_data_state_leftovers_of_a_killed_write_are_ignored(trained, data_dir, tmp_path):
    workdir = str(tmp_path / "copy")
    shutil.copytree(trained["straight"], workdir)
    folder = os.path.join(workdir, "checkpoints-meta", "data", "process_0")
    os.makedirs(os.path.join(folder, "step_14.tmp-999"))
    os.makedirs(os.path.join(folder, "step_1_temp"))
    run(main_args("train", workdir, data_dir, *TRAIN[1:], "--config.training.n_iters=14",
                  "--config.training.snapshot_sampling=False"))
    assert sorted(os.listdir(folder)) == ["step_12", "step_14"]


def test_images_that_are_not_finite_are_refused():
    from run_lib import files

    files.checked_images(np.zeros((2, 2)), "x")
    with pytest.raises(FloatingPointError, match="1 of 4 values .* NaN or infinite"):
        files.checked_images(np.array([[0.0, np.nan], [1.0, 0.5]]), "samples")
