"""Hostile inputs and damaged checkpoints that must stop with one line, without large
allocations and without trusting what cannot be verified (issue 26: items 1, 2, 5, 6, 8, 9).

In-process where possible; the few subprocess runs start main.py as a user would.
"""

import io
import logging
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile
from run_helpers import ROOT

import data_files

# ----------------------------------------------------------------------------- .npz bombs

BOMB_SHAPE = (4108898, 28, 28)  # 3.0 GiB of uint8 declared
STORED = 100  # images actually in the member


def _write_bomb(path, shape=BOMB_SHAPE, stored=STORED, key="images"):
    """An .npz whose deflated member's .npy header (and zip directory) declare `shape`, as a
    deflated member of zeros of that size would, while only `stored` images are in the file."""
    first = np.random.RandomState(0).randint(0, 256, (stored,) + shape[1:]).astype(np.uint8)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    payload = header.getvalue() + first.tobytes()
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{key}.npy", payload)
    declared = len(header.getvalue()) + int(np.prod(shape))
    assert declared < 2**32  # fits the 32-bit size fields patched below
    raw = bytearray(open(path, "rb").read())
    local, central = raw.find(b"PK\x03\x04"), raw.find(b"PK\x01\x02")
    raw[local + 22:local + 26] = declared.to_bytes(4, "little")  # uncompressed size
    raw[central + 24:central + 28] = declared.to_bytes(4, "little")
    open(path, "wb").write(bytes(raw))
    return first


def _peak_mib(fn):
    tracemalloc.start()
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 (returned for the caller to check)
        result = e
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return result, peak


def test_npz_bomb_is_refused_from_its_header_without_allocating(tmp_path):
    path = str(tmp_path / "bomb.npz")
    _write_bomb(path)
    assert os.path.getsize(path) < 200_000
    t0 = time.time()
    error, peak = _peak_mib(lambda: data_files.read_npz(path))
    assert isinstance(error, data_files.DataError), error
    message = str(error)
    assert path in message and "'images'" in message and "[4108898, 28, 28]" in message
    assert "more than the 2,048 MiB allowed" in message and "\n" not in message
    assert peak < 20 and time.time() - t0 < 5, (peak, time.time() - t0)
    # Through the inputs' reader, with every image asked for (num_inputs=0): the same line.
    with pytest.raises(data_files.DataError, match="declares shape"):
        data_files.load_images(path, 28, 1)


def test_npz_inputs_read_only_the_images_used(tmp_path):
    path = str(tmp_path / "bomb.npz")
    first = _write_bomb(path)
    (images, names), peak = _peak_mib(lambda: data_files.load_images(path, 28, 1, max_images=8))
    assert images.shape == (8, 28, 28, 1) and names == [f"npz[{i}]" for i in range(8)]
    np.testing.assert_array_equal(images[..., 0], first[:8])
    assert peak < 20, peak
    # A member that stores fewer bytes than its header declares (and is asked for all of
    # them under the cap) is damaged, named as such.
    small = str(tmp_path / "short.npz")
    _write_bomb(small, shape=(5000, 28, 28), stored=10)
    with pytest.raises(data_files.DataError, match=r"short\.npz.*ends after 7,840 of 3,920,000"):
        data_files.read_npz(small)


def test_npz_reader_round_trips_and_refuses_pickles(tmp_path):
    path = str(tmp_path / "ok.npz")
    a = np.arange(24, dtype=">f4").reshape(2, 3, 4)
    b = np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4))
    np.savez_compressed(path, a=a, b=b, c=np.float64(2.5))
    got = data_files.read_npz(path)
    assert sorted(got) == ["a", "b", "c"] and got["a"].dtype == np.float32
    for k, v in (("a", a), ("b", b), ("c", np.float64(2.5))):
        np.testing.assert_array_equal(got[k], v)
    np.testing.assert_array_equal(data_files.read_npz(path, ["a"], max_rows=1)["a"], a[:1])
    assert got["a"].flags.writeable
    objects = str(tmp_path / "objects.npz")
    np.savez(objects, x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(data_files.DataError, match=r"objects\.npz: cannot be read as an \.npz file "
                       r"\(array 'x' holds Python objects"):
        data_files.read_npz(objects)
    not_zip = str(tmp_path / "junk.npz")
    open(not_zip, "wb").write(b"PK\x03\x04 not really")
    with pytest.raises(data_files.DataError, match=r"junk\.npz: cannot be read"):
        data_files.read_npz(not_zip)


def test_stats_file_bomb_is_refused_naming_it(tmp_path):
    from ml_collections import ConfigDict

    import evaluation

    path = tmp_path / "stats.npz"
    _write_bomb(str(path), key="pool_3")
    config = ConfigDict({"data": {"dataset": "X", "image_size": 28},
                         "eval": {"stats_dir": str(tmp_path)}})
    stats_path = evaluation.dataset_stats_path(config)
    os.replace(path, stats_path)
    error, peak = _peak_mib(lambda: evaluation.load_dataset_stats(config))
    assert isinstance(error, data_files.DataError) and stats_path in str(error), error
    assert peak < 20


# ----------------------------------------------------------------------------- PNG headers


def _png_declaring(path, width, height):
    """A small valid PNG whose IHDR is then rewritten to declare width x height (CRC fixed)."""
    Image.new("L", (4, 4)).save(path)
    raw = bytearray(open(path, "rb").read())
    at = raw.find(b"IHDR")
    raw[at + 4:at + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    raw[at + 17:at + 21] = zlib.crc32(bytes(raw[at:at + 17])).to_bytes(4, "big")
    open(path, "wb").write(bytes(raw))


def test_huge_png_is_refused_from_its_header(tmp_path, monkeypatch):
    path = str(tmp_path / "huge.png")
    _png_declaring(path, 12000, 12000)

    def no_decoding(self):
        raise AssertionError("pixels decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(data_files.DataError, match=r"huge\.png: the image is 12000x12000"):
        data_files.load_images(path, 28, 1)
    # Beyond Pillow's bomb limit: Pillow refuses it at open; one line, not its exception.
    _png_declaring(path, 20000, 20000)
    with pytest.raises(data_files.DataError, match=r"huge\.png: cannot be read as an image "
                       r"\(Image size \(400000000 pixels\) exceeds"):
        data_files.load_images(path, 28, 1)


# ----------------------------------------------------------------------------- config file


def test_missing_config_file_fails_at_once_without_overrides(tmp_path):
    t0 = time.time()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--mode=train",
                           f"--workdir={tmp_path / 'w'}", "--config=configs/nonexistent.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "error: --config=configs/nonexistent.py: no such config file (looked for "
        f"{os.path.join(ROOT, 'configs', 'nonexistent.py')})."]
    assert time.time() - t0 < 5  # nothing heavy was imported
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--mode=train",
                           f"--workdir={tmp_path / 'w'}", "--config", "configs"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --config=configs is a folder")
    assert not os.path.exists(tmp_path / "w")




# ----------------------------------------------------------------------------- checkpoints


def _managers(tmp_path):
    from ml_collections import ConfigDict

    from run_lib import checkpoints

    config = ConfigDict({"training": {"max_ckpts_to_keep": 0, "snapshot_freq": 4}})
    return config, *checkpoints.managers(str(tmp_path / "w"), config)


def _state(step):
    import jax.numpy as jnp

    return {"step": jnp.asarray(step, jnp.int32), "w": jnp.full((64, 64), float(step))}


def _abstract():
    import jax

    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def _garble_arrays(folder):
    files = [os.path.join(r, n) for r, _, ns in os.walk(folder) for n in ns
             if "/d/" in os.path.join(r, n)]
    path = max(files, key=os.path.getsize)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        f.write(os.urandom(400))


@pytest.mark.parametrize("fault", ["manifest missing", "manifest truncated"])
def test_unverifiable_meta_checkpoint_falls_back_to_the_previous_good_one(tmp_path, caplog,
                                                                          fault):
    from run_lib import checkpoints

    _, _, meta = _managers(tmp_path)
    for step in (2, 4):
        checkpoints.save(meta, step, _state(step), "meta", step)
    newest = checkpoints.step_dir(meta, 4)
    manifest = os.path.join(newest, checkpoints.MANIFEST)
    if fault == "manifest missing":  # a partial copy: no manifest, and damaged array data
        os.remove(manifest)
        _garble_arrays(newest)
    else:
        os.truncate(manifest, 20)
    state, step = checkpoints.restore_newest_good(meta, _abstract())
    assert step == 2 and int(state["step"]) == 2 and float(state["w"][0, 0]) == 2.0
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and newest in warning[0], warning
    assert "Falling back to an older checkpoint" in warning[0]
    assert ("has no score_sde_manifest.json: the checkpoint is incomplete" in warning[0]
            if fault == "manifest missing" else f"{manifest} is damaged" in warning[0])
    # Evaluation's reader refuses it with the same one line (no JSONDecodeError).
    with pytest.raises(checkpoints.DamagedCheckpointError, match=newest):
        checkpoints.restore(meta, 4, _abstract())


def test_checkpoint_of_another_config_names_its_first_parameter(tmp_path):
    import jax
    import jax.numpy as jnp

    from run_lib import checkpoints

    _, _, meta = _managers(tmp_path)
    state = {"params": {"w": jnp.zeros((4, 3))}, "opt_state": {"mu": jnp.zeros((4, 3))}}
    checkpoints.save(meta, 2, state, "meta", 2)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    checkpoints.check_matches(meta, 2, abstract)  # the same shapes: no error
    # The parameters are named before Adam's moments, though 'opt_state' sorts first.
    other = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((4, 5), x.dtype), state)
    with pytest.raises(checkpoints.ConfigMismatchError) as e:
        checkpoints.check_matches(meta, 2, other)
    assert str(e.value) == (
        f"{checkpoints.step_dir(meta, 2)} was written for a different config: parameter "
        "'params.w' has shape (4, 3) in the checkpoint but (4, 5) in this config. Use the "
        "config that wrote it (its config.json in the workdir) or another --workdir.")


def test_only_incomplete_checkpoints_start_afresh_but_damage_stops(tmp_path):
    from run_lib import checkpoints

    _, _, meta = _managers(tmp_path)
    checkpoints.save(meta, 2, _state(2), "meta", 2)
    folder = checkpoints.step_dir(meta, 2)
    os.remove(os.path.join(folder, checkpoints.MANIFEST))  # a kill before the manifest
    assert checkpoints.restore_newest_good(meta, _abstract()) == (None, None)
    checkpoints.write_manifest(folder, 2)
    _garble_arrays(folder)
    with pytest.raises(checkpoints.DamagedCheckpointError, match="Every preemption checkpoint"):
        checkpoints.restore_newest_good(meta, _abstract())


def test_non_finite_loss_names_the_last_verified_state_not_the_newest_folder(tmp_path):
    from run_lib import training

    config, snapshots, meta = _managers(tmp_path)
    run = training._Run(config, str(tmp_path / "w"), snapshots, meta, None, None, None,
                        good_step=10)
    with pytest.raises(FloatingPointError, match=r"the last good state is step 10 in "):
        training._checked_losses(np.array([np.nan, 1.0]), 14, run)
    run.good_step = None
    with pytest.raises(FloatingPointError, match="no checkpoint has been written or verified"):
        training._checked_losses(np.array([np.inf]), 2, run)


def test_snapshots_are_never_overwritten_by_a_longer_run(tmp_path, caplog):
    from run_lib import checkpoints, training

    caplog.set_level(logging.INFO)
    config, snapshots, meta = _managers(tmp_path)
    run = training._Run(config, str(tmp_path / "w"), snapshots, meta, None, None, None)
    # A run to n_iters=6 with snapshot_freq=4: checkpoint_1 = step 4, checkpoint_2 = step 6.
    for step in (4, 6):
        run.save_snapshot(step, _state(step))
    assert [run._held_step(k) for k in (1, 2)] == [4, 6]
    # Extended to 12: step 8 (k = 2 is taken) goes to 3, step 12 (k = 3 is taken) to 4.
    run.save_snapshot(8, _state(8))
    assert "checkpoint_2 holds step 6 (the end of an earlier run) and is kept; step 8 is " \
           "saved as checkpoint_3." in caplog.text
    assert run._snapshot_slot(8) == (3, True)  # a restart does not save it twice
    # A save of step 12 killed before its manifest is written again in the same slot.
    checkpoints.save(snapshots, 4, _state(12), "snapshot", 12)
    os.remove(os.path.join(checkpoints.step_dir(snapshots, 4), checkpoints.MANIFEST))
    run.save_snapshot(12, _state(12))
    assert sorted(snapshots.all_steps()) == [1, 2, 3, 4]
    assert [run._held_step(k) for k in (1, 2, 3, 4)] == [4, 6, 8, 12]
    for k, step in ((2, 6), (3, 8), (4, 12)):
        restored = checkpoints.restore(snapshots, k, _abstract())
        assert int(restored["step"]) == step and float(restored["w"][0, 0]) == step


# ----------------------------------------------------------------------------- pipeline state


def test_pipeline_state_is_a_position_that_resumes_bit_exact(data_dir, tmp_path):
    import datasets
    from configs import tiny_test
    from run_lib import checkpoints

    config = tiny_test.get_config()
    config.data.data_dir = data_dir
    config.data.uniform_dequantization = True  # the noise must resume too

    def make(start):
        return datasets.get_dataset(config, uniform_dequantization=True, start_batch=start)[0]

    train_ds, _, source = datasets.get_dataset(config, uniform_dequantization=True)
    assert source.seekable
    straight = checkpoints.PositionIterator(make, first=train_ds)
    batches = [straight.get_next() for _ in range(12)]
    # Each epoch (64 images = 4 batches of 2 x 8) is a permutation of the training images.
    plain = iter(datasets.get_dataset(config)[0])
    stored = np.concatenate([b["image"].numpy() for b in
                             datasets.get_dataset(config, evaluation=True)[0]])
    for _ in range(2):
        epoch = np.concatenate([plain.get_next()["image"].numpy().reshape(-1, 28, 28, 1)
                                for _ in range(4)])
        assert sorted(map(bytes, epoch)) == sorted(map(bytes, stored))
    # Stopped after 7 batches: the saved state is one number, and restoring it gives the rest.
    killed = checkpoints.PositionIterator(make, first=make(0))
    for _ in range(7):
        killed.get_next()
    size = checkpoints.save_data_state(str(tmp_path), 14, killed)
    assert size < 100, size
    resumed = checkpoints.PositionIterator(make)
    assert checkpoints.restore_data_state(str(tmp_path), 14, resumed)
    for want in batches[7:]:
        got = resumed.get_next()
        np.testing.assert_array_equal(got["image"].numpy(), want["image"].numpy())
        np.testing.assert_array_equal(got["label"].numpy(), want["label"].numpy())


# ----------------------------------------------------------------------------- Ctrl-C

# A run whose main thread is inside one long library call (here a regular expression that
# backtracks for hours in C: Python runs no signal handler until such a call returns, as in
# an XLA compilation or a checkpoint write).
_BLOCKED_CHILD = f"""
import importlib.util, re, sys
spec = importlib.util.spec_from_file_location(
    "interrupt", {os.path.join(ROOT, "run_lib", "interrupt.py")!r})
interrupt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(interrupt)
with interrupt.graceful_sigint():
    print("ready", flush=True)
    re.match(r"(a*)*b", "a" * 40)
print("returned", flush=True)
"""


def test_second_ctrl_c_stops_at_once_even_inside_a_long_call():
    proc = subprocess.Popen([sys.executable, "-c", _BLOCKED_CHILD], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)  # the first asks for a stop at the next safe point
        time.sleep(1.0)
        assert proc.poll() is None
        sent = time.time()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert time.time() - sent < 5 and proc.returncode == 130
    # The first is acknowledged at once (from the watcher thread), the second ends the run.
    assert out == "" and err.strip().splitlines() == [
        "Ctrl-C: stopping at the next safe point (finished work is kept; the same command "
        "resumes); Ctrl-C again to stop without waiting.",
        "error: Interrupted again: stopped at once. Checkpoint writes are atomic: the same "
        "command resumes from the newest complete checkpoint."]


# ----------------------------------------------------------------------------- full disk


@pytest.fixture
def restored_globals():
    import logging as pylogging
    import threading

    hooks = (sys.excepthook, threading.excepthook, sys.unraisablehook)
    yield
    sys.excepthook, threading.excepthook, sys.unraisablehook = hooks
    pylogging.disable(pylogging.NOTSET)
    pylogging.raiseExceptions = True


def test_disk_full_is_one_line_with_the_whole_estimate_and_nothing_after(
        tmp_path, capfd, restored_globals, monkeypatch):
    import threading

    from run_lib import checkpoints

    _, _, meta = _managers(tmp_path)
    checkpoints.save(meta, 2, _state(2), "meta", 2, data_bytes=14)
    previous = sum(os.stat(os.path.join(r, n)).st_blocks * 512
                   for r, _, ns in os.walk(checkpoints.step_dir(meta, 2)) for n in ns)
    orbax_file = os.path.join(os.path.dirname(np.__file__), "..", "orbax", "future.py")

    def failing_save(*args, **kwargs):
        # What Orbax does on a full disk: its threads log errors and die with tracebacks,
        # then the save raises.
        record = logging.makeLogRecord({
            "name": "absl", "levelno": logging.ERROR, "levelname": "ERROR",
            "pathname": os.path.normpath(orbax_file),
            "msg": "_SignalingThread.run() raised an exception: RESOURCE_EXHAUSTED"})
        logging.getLogger("absl").handle(record)
        worker = threading.Thread(target=lambda: 1 / 0)
        worker.start()
        worker.join()
        raise ValueError("RESOURCE_EXHAUSTED: Failed to write 158312 bytes to file 15: No "
                         "space left on device [os_error_code='28']")

    monkeypatch.setattr(meta, "save", failing_save)
    with pytest.raises(checkpoints.DiskFullError) as caught:
        checkpoints.save(meta, 4, _state(4), "meta", 4, data_bytes=14)
    # The estimate: the model state (its arrays' bytes, or what the previous checkpoint takes
    # on disk if more) plus the pipeline state, and room for Orbax's temporary files.
    model = max(previous, 64 * 64 * 4 + 4)
    needed = checkpoints._fmt_bytes(int(1.25 * (model + 14)))
    message = str(caught.value)
    assert message.startswith(f"Disk full while writing a checkpoint to {meta.directory}: "
                              f"about {needed} needed (model state "
                              f"{checkpoints._fmt_bytes(model)} + input-pipeline state 14 "
                              "bytes, and room to write them), "), message
    # Orbax's failing threads say nothing, then or later (at exit).
    threading.Thread(target=lambda: 1 / 0).start()
    logging.getLogger("asyncio").error("_GatheringFuture exception was never retrieved")
    out, err = capfd.readouterr()
    assert "RESOURCE_EXHAUSTED" not in out + err and "ZeroDivisionError" not in out + err
    assert "GatheringFuture" not in out + err
    assert meta.all_steps() == [2] and not [n for n in os.listdir(meta.directory) if "tmp" in n]
