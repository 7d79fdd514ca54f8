"""Hostile inputs and damaged checkpoints that must stop with one line, without large
allocations and without trusting what cannot be verified (issue 26: items 1, 2, 5, 6, 8, 9).

In-process where possible; the few subprocess runs start main.py as a user would.
"""

import io
import os
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


