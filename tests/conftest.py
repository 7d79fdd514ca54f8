"""Fixtures shared by the end-to-end tests."""

import signal
import subprocess
import time

import pytest
from run_helpers import ENV, ROOT, TRAIN, main_args, meta_steps, run, write_fashion_subset


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The first 64 training and 32 test images of the real Fashion-MNIST, as IDX files."""
    return write_fashion_subset(tmp_path_factory.mktemp("fashion_subset"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_dir):
    """An uninterrupted run and a run SIGKILLed mid-training then restarted, side by side."""
    root = tmp_path_factory.mktemp("train")
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
