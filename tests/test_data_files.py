"""Tests for data_files.load_images (a user's own images from a folder or an .npz), re-exported
as datasets.load_images: channel conversions against Pillow and the 601-2 luma weights, name
order, and one clear error per bad input. All images are written by the tests."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

import data_files
import datasets
from data_files import DataError, load_images


def _rgb(n, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3)).astype(np.uint8)


def _save(folder, names, arrays, mode=None):
    for name, a in zip(names, arrays, strict=True):
        Image.fromarray(a, mode).save(folder / name)


def test_reexported_by_datasets():
    assert datasets.load_images is load_images and datasets.DataError is DataError
    assert issubclass(DataError, ValueError)


def test_png_folder_round_trip_in_name_order(tmp_path):
    rgb = _rgb(3)
    _save(tmp_path, ["b.png", "a.png", "c.PNG"], rgb)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub.png").mkdir()  # a folder is not an image, whatever its name
    images, names = load_images(str(tmp_path), 8, 3)
    assert names == ["a.png", "b.png", "c.PNG"]
    assert images.dtype == np.uint8 and images.shape == (3, 8, 8, 3)
    np.testing.assert_array_equal(images, rgb[[1, 0, 2]])


def test_rgb_to_grey_is_601_2_luma(tmp_path):
    rgb = _rgb(2, seed=1)
    _save(tmp_path, ["0.png", "1.png"], rgb)
    images, _ = load_images(str(tmp_path), 8, 1)
    assert images.shape == (2, 8, 8, 1)
    pillow = np.stack([np.asarray(Image.fromarray(x).convert("L")) for x in rgb])
    np.testing.assert_array_equal(images[..., 0], pillow)
    # ITU-R 601-2: L = 0.299 R + 0.587 G + 0.114 B (Pillow rounds its fixed-point form).
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(images[..., 0] - luma).max() <= 0.5 + 1e-3

    # The same pixels from an .npz become the same grey values.
    np.savez(tmp_path / "x.npz", images=rgb)
    from_npz, names = load_images(str(tmp_path / "x.npz"), 8, 1)
    np.testing.assert_array_equal(from_npz, images)
    assert names == ["npz[0]", "npz[1]"]


def test_grey_repeated_rgba_alpha_dropped_palette_expanded(tmp_path):
    rgb = _rgb(1, seed=2)[0]
    grey = rgb[..., 0]
    rgba = np.concatenate([rgb, np.arange(64, dtype=np.uint8).reshape(8, 8, 1)], axis=-1)
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    palette = Image.fromarray(rgb).quantize(colors=16)
    palette.save(tmp_path / "palette.png")
    images, names = load_images(str(tmp_path), 8, 3)
    assert names == ["grey.png", "palette.png", "rgba.png"]
    np.testing.assert_array_equal(images[0], np.repeat(grey[..., None], 3, axis=-1))
    lut = np.array(palette.getpalette(), np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(images[1], lut[np.asarray(palette)])
    np.testing.assert_array_equal(images[2], rgb)
    grey_only, _ = load_images(str(tmp_path / "grey.png"), 8, 1)  # one file as the path
    np.testing.assert_array_equal(grey_only, grey[None, ..., None])


def test_jpeg(tmp_path):
    # A smooth gradient survives JPEG with small errors.
    ramp = np.linspace(0, 255, 16, dtype=np.float64)
    rgb = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], 128.0), -1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(rgb).save(tmp_path / "b.JPEG", quality=95)
    images, names = load_images(str(tmp_path), 16, 3)
    assert names == ["a.jpg", "b.JPEG"] and images.shape == (2, 16, 16, 3)
    assert np.abs(images.astype(int) - rgb).mean() < 3.0


def test_npz_keys_dtypes_and_channels(tmp_path):
    rgb = _rgb(3, seed=3)
    np.savez(tmp_path / "both.npz", samples=rgb[:1], images=rgb)  # 'images' wins
    images, names = load_images(str(tmp_path / "both.npz"), 8, 3)
    np.testing.assert_array_equal(images, rgb)
    assert names == ["npz[0]", "npz[1]", "npz[2]"]

    x = np.random.default_rng(4).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    x[0, 0, 0] = [0.0, 1.0, 0.5]
    np.savez(tmp_path / "float.npz", samples=x)
    images, _ = load_images(str(tmp_path / "float.npz"), 8, 3)
    np.testing.assert_array_equal(images, np.round(x * 255.0).astype(np.uint8))
    assert list(images[0, 0, 0]) == [0, 255, 128]

    grey = rgb[..., 0]
    np.savez(tmp_path / "nhw.npz", whatever=grey)  # the only array, [N, H, W]
    images, _ = load_images(str(tmp_path / "nhw.npz"), 8, 1)
    np.testing.assert_array_equal(images, grey[..., None])
    images, _ = load_images(str(tmp_path / "nhw.npz"), 8, 3)
    np.testing.assert_array_equal(images, np.repeat(grey[..., None], 3, axis=-1))

    rgba = np.concatenate([rgb, np.zeros_like(rgb[..., :1])], axis=-1)
    np.savez(tmp_path / "rgba.npz", images=rgba)
    np.testing.assert_array_equal(load_images(str(tmp_path / "rgba.npz"), 8, 3)[0], rgb)


# ----------------------------------------------------------------------------- errors


def test_missing_path(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=rf"{path}: no such file or folder; expected"):
        load_images(path, 8, 3)


def test_folder_without_images_lists_extensions(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.gif").write_bytes(b"GIF89a")
    with pytest.raises(DataError, match=rf"{tmp_path}: .*no images.*\.png, \.jpg, \.jpeg"):
        load_images(str(tmp_path), 8, 3)


def test_other_file_type(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"a.txt: not an image or .npz file"):
        load_images(str(tmp_path / "a.txt"), 8, 3)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "unreadable"])
def test_corrupt_or_unreadable_image_named(tmp_path, monkeypatch, damage):
    _save(tmp_path, ["a.png", "b.png"], _rgb(2))
    bad = tmp_path / "b.png"
    if damage == "garbage":
        bad.write_bytes(os.urandom(200))
    elif damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:-60])
    else:
        os.chmod(bad, 0)
        if os.access(bad, os.R_OK):  # root reads anything: fail the open as for anyone else
            real_open = Image.open

            def denied(path, *args, **kwargs):
                if str(path) == str(bad):
                    raise PermissionError(13, "Permission denied", str(path))
                return real_open(path, *args, **kwargs)

            monkeypatch.setattr(data_files.Image, "open", denied)
    with pytest.raises(DataError, match=rf"{bad}: cannot be read as an image") as info:
        load_images(str(tmp_path), 8, 3)
    if damage == "unreadable":
        assert "Permission denied" in str(info.value)


def test_wrong_size_names_first_offending_file(tmp_path):
    _save(tmp_path, ["a.png"], _rgb(1))
    _save(tmp_path, ["b.png"], [np.zeros((6, 8, 3), np.uint8)])
    _save(tmp_path, ["c.png"], [np.zeros((5, 5, 3), np.uint8)])
    with pytest.raises(DataError, match=r"b.png: the image is 6x8 \(HxW\) but the model takes 8x8"):
        load_images(str(tmp_path), 8, 3)
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(DataError, match=r"x.npz: the images are 16x16 .* takes 8x8"):
        load_images(str(tmp_path / "x.npz"), 8, 3)


def test_16_bit_png(tmp_path):
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(DataError, match=r"deep.png: pixel mode 'I;16' is not 8-bit"):
        load_images(str(tmp_path), 8, 1)


@pytest.mark.parametrize(
    "arrays,reason",
    [
        (dict(a=np.zeros((1, 8, 8)), b=np.zeros((1, 8, 8))), r"holds the arrays \['a', 'b'\]"),
        ({}, r"holds the arrays \[\]; expected one named images or samples"),
        (dict(images=np.zeros((1, 8, 8), np.int64)), r"dtype int64; expected uint8, or float"),
        (dict(images=np.full((1, 8, 8), 1.5)), r"float images must lie in \[0, 1\]; .*1\.5\]"),
        (dict(images=np.full((1, 8, 8), -0.25)), r"must lie in \[0, 1\]; found \[-0\.25"),
        (dict(images=np.full((1, 8, 8), np.nan)), r"must lie in \[0, 1\]; found \[nan"),
        (dict(images=np.zeros((2, 3, 8, 8), np.uint8)), r"shape \[2, 3, 8, 8\]; expected"),
        (dict(images=np.zeros((0, 8, 8), np.uint8)), r"shape \[0, 8, 8, 1\]; .*N >= 1"),
        (dict(images=np.zeros((8, 8), np.uint8)), r"shape \[8, 8\]; expected"),
    ],
)
def test_npz_without_usable_images(tmp_path, arrays, reason):
    path = tmp_path / "x.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=rf"{path}: .*{reason}"):
        load_images(str(path), 8, 1)


def test_unreadable_npz(tmp_path):
    (tmp_path / "garbage.npz").write_bytes(os.urandom(300))
    with pytest.raises(DataError, match=r"garbage.npz: cannot be read as an .npz file"):
        load_images(str(tmp_path / "garbage.npz"), 8, 3)
    np.savez(tmp_path / "objects.npz", images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"objects.npz: cannot be read as an .npz file"):
        load_images(str(tmp_path / "objects.npz"), 8, 3)


def test_bad_num_channels(tmp_path):
    with pytest.raises(ValueError, match=r"num_channels=2; valid: 1 or 3"):
        load_images(str(tmp_path), 8, 2)
