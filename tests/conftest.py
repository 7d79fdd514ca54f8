"""Fixtures shared by the end-to-end tests.

Under pytest-xdist, the session fixtures that train or write data are built once for all
workers: the first worker to need one builds it in the session's shared temporary folder
while holding a file lock, and the others wait for it and read the result.
"""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

import pytest
from run_helpers import (
    CACHE_ENV,
    ENV,
    ROOT,
    TRAIN,
    main_args,
    meta_steps,
    run,
    write_fashion_subset,
)


def pytest_configure(config):
    # Set before xdist starts its workers, which inherit it: one persistent compilation
    # cache for all the subprocesses of the session, whichever worker starts them.
    if not hasattr(config, "workerinput") and CACHE_ENV not in os.environ:
        os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="score_sde_jax_cache_")


def _built_once(tmp_path_factory, name, build):
    """build(folder) -> a JSON-able result, run in a fresh `folder` by the first of the
    session's workers to ask, under an exclusive lock; the others read its result."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the session's folder above every worker's own
    folder, done = root / name, root / f"{name}.json"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            done.write_text(json.dumps(build(folder)))
        return json.loads(done.read_text())


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The first 64 training and 32 test images of the real Fashion-MNIST, as IDX files."""
    return _built_once(tmp_path_factory, "fashion_subset", write_fashion_subset)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_dir):
    """An uninterrupted run and a run SIGKILLed mid-training then restarted, side by side.

    Tests copy these folders before changing anything in them."""
    return _built_once(tmp_path_factory, "train",
                       lambda folder: _train_side_by_side(folder, data_dir))


def _train_side_by_side(root, data_dir):
    straight, killed = str(root / "straight"), str(root / "killed")
    first = subprocess.Popen(main_args("train", straight, data_dir, *TRAIN), cwd=ROOT, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    victim = subprocess.Popen(main_args("train", killed, data_dir, *TRAIN), cwd=ROOT, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900
    while not any(s >= 4 for s in meta_steps(killed)):
        assert victim.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed_at = max(meta_steps(killed))
    assert killed_at < 12
    run(main_args("train", killed, data_dir, *TRAIN))
    _, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-4000:]
    return {"straight": straight, "killed": killed, "killed_at": killed_at, "log": err}
