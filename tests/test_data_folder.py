"""Tests for the user's own data sets: `config.data.dataset='folder'` (data_folder.py and its
registration in datasets.py), 'tfds:<name>', plugin data sets through
`datasets.register_dataset`, their config checks, and one end-to-end chain through main.py
(train, eval, sample, train_classifier) on a generated folder of mixed sizes and formats."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from run_helpers import main_args, run

import configs
import data_folder
import datasets
from run_lib import checks

CLASSES = ("cats", "dogs", "zebras")


def _pattern(h, w, channels, seed):
    """A smooth image with a per-seed offset: distinct images, compressible as JPEG."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = (yy * 3 + xx * 5 + seed * 37) % 256
    img = np.stack([(base + 80 * c) % 256 for c in range(channels)], -1).astype(np.uint8)
    return img[..., 0] if channels == 1 else img


# (relative path, (H, W), channels): mixed formats, sizes, grey / RGB / RGBA, nested folders.
FILES = [
    ("cats/a.png", (40, 60), 3),
    ("cats/b.jpg", (50, 30), 1),
    ("cats/sub/c.webp", (33, 33), 3),
    ("dogs/d.png", (20, 20), 4),
    ("dogs/e.webp", (24, 48), 1),
    ("dogs/f.JPEG", (64, 40), 3),
    ("zebras/g.png", (16, 16), 1),
]


def _save(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "L" if array.ndim == 2 else {3: "RGB", 4: "RGBA"}[array.shape[-1]]
    options = {".jpg": {"quality": 95}, ".jpeg": {"quality": 95}, ".webp": {"lossless": True}}
    Image.fromarray(array, mode).save(path, **options.get(os.path.splitext(path)[1].lower(), {}))


def write_folder(root, files=FILES, copies=1):
    """Writes `files` (each `copies` times, as name_<k>.ext) plus files the reader ignores."""
    for k in range(copies):
        for i, (rel, (h, w), c) in enumerate(files):
            stem, ext = os.path.splitext(rel)
            name = rel if copies == 1 else f"{stem}_{k}{ext}"
            _save(os.path.join(root, name), _pattern(h, w, c, i + 100 * k))
    with open(os.path.join(root, "cats", "notes.txt"), "w") as f:
        f.write("not an image")
    os.makedirs(os.path.join(root, ".hidden"), exist_ok=True)
    _save(os.path.join(root, ".hidden", "x.png"), _pattern(8, 8, 3, 0))
    return str(root)


def make_config(data_dir, cache_dir, image_size=16, channels=3, **data):
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = ml_collections.ConfigDict(dict(
        dataset="folder", data_dir=str(data_dir), cache_dir=str(cache_dir),
        image_size=image_size, num_channels=channels, random_flip=False, centered=False,
        uniform_dequantization=False, eval_dir="", eval_fraction=0.0, eval_split=""))
    config.data.update(data)
    config.training = ml_collections.ConfigDict(dict(batch_size=1, n_jitted_steps=1))
    config.eval = ml_collections.ConfigDict(dict(batch_size=1))
    return config


def all_batches(ds):
    batches = [jax.tree.map(np.asarray, b) for b in ds.take(10_000)]
    return (np.concatenate([b["image"] for b in batches]),
            np.concatenate([b["label"] for b in batches]))


# ----------------------------------------------------------------------------- the folder


@pytest.mark.parametrize("channels", [1, 3])
def test_folder_shapes_dtype_labels(tmp_path, channels):
    root = write_folder(tmp_path / "data")
    config = make_config(root, tmp_path / "cache", channels=channels)
    train_ds, eval_ds, source = datasets.get_dataset(config, evaluation=True)
    assert source.class_names == CLASSES and datasets.class_names(source) == CLASSES
    for ds in (train_ds, eval_ds):  # no eval_dir / eval_fraction: both are the folder
        images, labels = all_batches(ds)
        assert images.shape == (7, 16, 16, channels) and images.dtype == np.float32
        np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1, 2])  # sorted file order
        np.testing.assert_array_equal(np.round(images * 255) / 255, images)  # 8-bit values
    cached = data_folder.cached_images(root, 16, channels, str(tmp_path / "cache"))
    assert cached.names == ("cats/a.png", "cats/b.jpg", "cats/sub/c.webp", "dogs/d.png",
                            "dogs/e.webp", "dogs/f.JPEG", "zebras/g.png")
    np.testing.assert_array_equal(cached.images, np.round(images * 255).astype(np.uint8))
    if channels == 3:  # a grey file becomes three equal channels
        grey = cached.images[1].astype(int)
        assert np.all(grey[..., 0] == grey[..., 1]) and np.all(grey[..., 1] == grey[..., 2])

    config.training.batch_size, config.training.n_jitted_steps = 2, 3
    (batch,) = [jax.tree.map(np.asarray, b) for b in datasets.get_dataset(config)[0].take(1)]
    assert batch["image"].shape == (3, 2, 16, 16, channels) and batch["label"].shape == (3, 2)


def test_unlabelled_folder_and_mixed_layout(tmp_path):
    flat = [(os.path.basename(rel), hw, c) for rel, hw, c in FILES[:3]]
    root = tmp_path / "flat"
    for i, (name, (h, w), c) in enumerate(flat):
        _save(str(root / name), _pattern(h, w, c, i))
    config = make_config(root, tmp_path / "cache")
    _, eval_ds, source = datasets.get_dataset(config, evaluation=True)
    _, labels = all_batches(eval_ds)
    np.testing.assert_array_equal(labels, [datasets.NO_LABEL] * 3)
    assert source.class_names is None and datasets.class_names(source) is None

    _save(str(root / "extra" / "x.png"), _pattern(8, 8, 3, 0))  # a subfolder next to files
    with pytest.raises(datasets.DataError, match=r"holds 3 image\(s\) at its top level"):
        datasets.get_dataset(config)


def _stripes(h, w, vertical):
    """Three bands across the longer side: red, green (the middle half), blue."""
    img = np.zeros((h, w, 3), np.uint8)
    n = w if not vertical else h
    bands = [(0, n // 4, 0), (n // 4, 3 * n // 4, 1), (3 * n // 4, n, 2)]
    for lo, hi, c in bands:
        if vertical:
            img[lo:hi, :, c] = 255
        else:
            img[:, lo:hi, c] = 255
    return img


@pytest.mark.parametrize("vertical", [False, True])
def test_resize_shorter_side_and_centre_crop(tmp_path, vertical):
    # 40 x 80 (or 80 x 40): the shorter side goes to 16 (a factor of 2.5), the longer to 32;
    # the centre 16 x 16 crop is the middle half of the longer side: the green band.
    h, w = (80, 40) if vertical else (40, 80)
    path = str(tmp_path / "s.png")
    Image.fromarray(_stripes(h, w, vertical)).save(path)
    out = data_folder.decode_image(path, 16, 3)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    inner = out[3:13] if vertical else out[:, 3:13]  # away from the bands' blurred edges
    np.testing.assert_array_equal(inner[..., 1], 255)
    np.testing.assert_array_equal(inner[..., [0, 2]], 0)
    edge = out[0] if vertical else out[:, 0]
    assert edge[..., 1].min() > 128  # mostly green even at the crop's border
    # At the stored size nothing is resampled: the pixels come back exactly.
    img = _pattern(16, 16, 3, 5)
    Image.fromarray(img).save(path)
    np.testing.assert_array_equal(data_folder.decode_image(path, 16, 3), img)
    r, g, b = (img[..., i].astype(np.uint32) for i in range(3))
    expected_grey = ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)
    np.testing.assert_array_equal(data_folder.decode_image(path, 16, 1)[..., 0], expected_grey)


def test_random_flip_only_on_training_split(tmp_path):
    img = np.full((16, 16, 3), 10, np.uint8)
    img[:, :8] = 200  # bright left half
    for i in range(4):
        _save(str(tmp_path / "data" / f"{i}.png"), img)
    config = make_config(tmp_path / "data", tmp_path / "cache", random_flip=True)
    config.training.batch_size, config.training.n_jitted_steps = 4, 2
    train_ds, eval_ds, _ = datasets.get_dataset(config)

    def flipped(ds):
        x = np.concatenate([np.asarray(b["image"]).reshape(-1, 16, 16, 3) for b in ds.take(4)])
        left, right = x[:, :, :8].mean(axis=(1, 2, 3)), x[:, :, 8:].mean(axis=(1, 2, 3))
        assert np.all(np.abs(left - right) > 0.5)
        return right > left

    train_flips = flipped(train_ds)  # 32 fair coins: all equal with probability 2^-31
    assert train_flips.any() and not train_flips.all()
    assert not flipped(eval_ds).any()


def test_eval_fraction_split_is_deterministic_and_disjoint(tmp_path):
    root = write_folder(tmp_path / "data", copies=4)  # 28 images
    config = make_config(root, tmp_path / "cache", eval_fraction=0.25)
    train_ds, eval_ds, source = datasets.get_dataset(config, evaluation=True)
    train_x, train_y = all_batches(train_ds)
    eval_x, eval_y = all_batches(eval_ds)
    assert (len(train_x), len(eval_x)) == (21, 7)  # round(0.25 * 28) held out
    assert source.num_examples == {"train": 21, "eval": 7}
    every = np.concatenate([train_x, eval_x]).reshape(28, -1)
    assert len(np.unique(every, axis=0)) == 28  # disjoint, and together all images
    again = all_batches(datasets.get_dataset(config, evaluation=True)[1])
    np.testing.assert_array_equal(again[0], eval_x)
    np.testing.assert_array_equal(again[1], eval_y)
    train, held = data_folder.holdout_split([f"f{i}" for i in range(10)], 0.01)
    assert (len(train), len(held)) == (9, 1)  # at least one held out


def test_eval_dir_labels_follow_the_training_classes(tmp_path):
    root = write_folder(tmp_path / "data")
    held = tmp_path / "held"
    _save(str(held / "zebras" / "z.png"), _pattern(20, 20, 3, 1))
    _save(str(held / "cats" / "c.png"), _pattern(20, 20, 3, 2))
    config = make_config(root, tmp_path / "cache", eval_dir=str(held))
    _, eval_ds, source = datasets.get_dataset(config, evaluation=True)
    _, labels = all_batches(eval_ds)
    np.testing.assert_array_equal(labels, [0, 2])  # cats = 0, zebras = 2 as in data_dir
    assert source.num_examples == {"train": 7, "eval": 2}
    _save(str(held / "lions" / "l.png"), _pattern(20, 20, 3, 3))
    with pytest.raises(datasets.DataError, match=r"class subfolder 'lions' is not a class"):
        datasets.get_dataset(config, evaluation=True)


def test_cache_is_reused_until_the_folder_changes(tmp_path, monkeypatch):
    root = write_folder(tmp_path / "data")
    cache = tmp_path / "cache"
    config = make_config(root, cache)
    first = all_batches(datasets.get_dataset(config, evaluation=True)[0])[0]
    (npy,) = [p for p in os.listdir(cache) if p.endswith(".npy")]
    assert json.loads((cache / npy.replace(".npy", ".json")).read_text())["classes"] == \
        list(CLASSES)
    stamp = os.stat(cache / npy).st_mtime_ns

    calls = []
    real = data_folder.decode_image
    monkeypatch.setattr(data_folder, "decode_image",
                        lambda *a: calls.append(a[0]) or real(*a))
    second = all_batches(datasets.get_dataset(config, evaluation=True)[0])[0]
    np.testing.assert_array_equal(second, first)
    assert calls == [] and os.stat(cache / npy).st_mtime_ns == stamp  # nothing decoded
    # A training pipeline reads the same cache: epochs after the first decode nothing either.
    config.training.batch_size = 7
    train_ds = datasets.get_dataset(config)[0]
    seen = np.concatenate([np.asarray(b["image"]).reshape(7, -1) for b in train_ds.take(3)])
    known = {row.tobytes() for row in first.reshape(7, -1)}
    assert {row.tobytes() for row in seen} <= known  # all from the cache
    assert calls == []

    # Another size, or a changed file: decoded again, into a new cache file.
    path = os.path.join(root, "dogs", "d.png")
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))
    datasets.get_dataset(config, evaluation=True)
    assert sorted(calls) == sorted(os.path.join(root, name) for name, _, _ in FILES)
    assert len([p for p in os.listdir(cache) if p.endswith(".npy")]) == 2
    assert not [p for p in os.listdir(cache) if p.endswith(".tmp")]


def test_npz_as_data_dir(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 20, 30, 3)).astype(np.uint8)
    labels = np.array([2, 0, 1, 1, 0, 2])
    path = str(tmp_path / "set.npz")
    np.savez(path, images=images, labels=labels)
    config = make_config(path, tmp_path / "cache", image_size=20)
    _, eval_ds, source = datasets.get_dataset(config, evaluation=True)
    x, y = all_batches(eval_ds)
    np.testing.assert_array_equal(y, labels)
    # 20 x 30 at size 20: no resize, the centre 20 columns.
    np.testing.assert_array_equal(np.round(x * 255).astype(np.uint8), images[:, :, 5:25])
    assert source.class_names == ("0", "1", "2")
    np.savez(path, images=images[..., 0])  # grey [N, H, W], unlabelled
    _, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
    x, y = all_batches(eval_ds)
    assert x.shape == (6, 20, 20, 3) and np.all(y == datasets.NO_LABEL)


def test_bad_image_names_its_file(tmp_path):
    root = write_folder(tmp_path / "data")
    bad = os.path.join(root, "dogs", "broken.png")
    with open(bad, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    config = make_config(root, tmp_path / "cache")
    with pytest.raises(datasets.DataError) as info:
        datasets.get_dataset(config)
    message = str(info.value)
    assert message.startswith(f"{bad}: cannot be read as an image") and "\n" not in message
    assert os.listdir(tmp_path / "cache") == []  # no partial cache left behind
    os.remove(bad)
    os.mkdir(tmp_path / "empty")
    with pytest.raises(datasets.DataError, match=r"holds no images .*\.webp"):
        datasets.get_dataset(make_config(tmp_path / "empty", tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        datasets.get_dataset(make_config(tmp_path / "none", tmp_path / "cache"))


# ----------------------------------------------------------------------------- tfds:<name>


def test_any_tfds_dataset_by_name(tmp_path):
    with tfds.testing.mock_data(num_examples=6):
        config = make_config("", tmp_path, image_size=16, channels=1, dataset="tfds:cifar100")
        config.data.data_dir = ""
        train_ds, eval_ds, builder = datasets.get_dataset(config, evaluation=True)
        assert builder.name == "cifar100"
        assert len(datasets.class_names(builder)) == 100
        raw = list(builder.as_dataset(split="test").as_numpy_iterator())
        for ds in (train_ds, eval_ds):
            x, y = all_batches(ds)
            assert x.shape == (6, 16, 16, 1) and x.dtype == np.float32
            assert np.all((y >= 0) & (y < 100))
        np.testing.assert_array_equal(y, [r["label"] for r in raw])  # eval = 'test', in order
        config.data.num_channels, config.data.image_size = 3, 32  # native size: exact pixels
        x, _ = all_batches(datasets.get_dataset(config, evaluation=True)[1])
        np.testing.assert_array_equal(x, np.stack([r["image"] for r in raw]) / np.float32(255))


def test_tfds_names_are_checked_before_anything_runs():
    config = configs.complete(configs.project_defaults())
    config.data.dataset = "tfds:no_such_dataset_here"
    with pytest.raises(checks.ConfigError, match=r"'no_such_dataset_here' is not a TFDS"):
        checks.validate_config(config)


# ----------------------------------------------------------------------------- registry, checks


def test_plugin_dataset_through_register_dataset(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(10, 8, 8)).astype(np.uint8)  # grey [N, H, W]

    @datasets.register_dataset(name="test_scans", channels=1)
    def test_scans(config, request):
        assert isinstance(request, datasets.LoadRequest)
        return datasets.Splits(train=(x[:6], np.arange(6)), eval=x[6:])

    try:
        assert "test_scans" in datasets.valid_names()
        config = make_config("", tmp_path, image_size=8, channels=1, dataset="test_scans")
        train_ds, eval_ds, source = datasets.get_dataset(config, evaluation=True)
        tx, ty = all_batches(train_ds)
        ex, ey = all_batches(eval_ds)
        np.testing.assert_array_equal(np.round(tx[..., 0] * 255), x[:6])
        np.testing.assert_array_equal(ty, np.arange(6))
        np.testing.assert_array_equal(np.round(ex[..., 0] * 255), x[6:])
        np.testing.assert_array_equal(ey, [datasets.NO_LABEL] * 4)
        assert source is None
        datasets.register_dataset(name="test_scans", channels=1)(test_scans)  # same: replaced
        with pytest.raises(ValueError, match="already registered"):
            datasets.register_dataset(name="test_scans")(lambda config, request: None)
        with pytest.raises(ValueError, match=r"num_channels=3 but test_scans has 1"):
            datasets.get_dataset(make_config("", tmp_path, channels=3, dataset="test_scans"))
    finally:
        datasets._REGISTRY.pop("test_scans")


def test_config_checks_of_folder_and_names():
    config = configs.complete(configs.project_defaults())
    config.data.dataset = "Folder"
    with pytest.raises(checks.ConfigError, match=r"'Folder'; valid: \[.*'FashionMNIST', "
                                                 r"'folder', 'tfds:<name>'\]"):
        checks.validate_config(config)
    config.data.dataset = "folder"
    with pytest.raises(checks.ConfigError, match=r"reads config.data.data_dir, which is empty"):
        checks.validate_config(config)
    config.data.data_dir, config.data.eval_fraction = "/some/images", 1.0
    with pytest.raises(checks.ConfigError, match=r"eval_fraction=1.0 must lie in \[0, 1\)"):
        checks.validate_config(config)
    config.data.eval_fraction = 0.1
    config.training.compile_cache_dir = ""  # prepare() would switch this process's cache on
    checks.validate_config(config)  # nothing is read: the folder need not exist yet
    prepared = checks.prepare(config, "train", "/runs/a")
    assert prepared.data.cache_dir == os.path.join("/runs/a", "data_cache")
    config.data.cache_dir = "/fast/cache"
    assert checks.prepare(config, "train", "/runs/a").data.cache_dir == "/fast/cache"


# ----------------------------------------------------------------------------- end to end


def test_folder_trains_evaluates_samples_and_trains_a_classifier(tmp_path):
    """train (with eval losses), eval (loss), sample and train_classifier through main.py on a
    generated folder of 42 mixed-size PNG / JPEG / WebP, grey, colour and RGBA images in 3
    class subfolders, with a quarter held out for evaluation (10 images)."""
    root = write_folder(tmp_path / "images", copies=6)
    workdir = str(tmp_path / "work")
    folder = ("--config.data.dataset=folder", "--config.data.eval_fraction=0.25",
              "--config.data.random_flip=True", "--config.classifier.num_classes=3")
    run(main_args("train", workdir, root, *folder, "--config.training.n_iters=4"))
    cache = os.path.join(workdir, "data_cache")
    (npy,) = [n for n in os.listdir(cache) if n.endswith(".npy")]
    stamp = os.stat(os.path.join(cache, npy)).st_mtime_ns
    assert np.load(os.path.join(cache, npy), mmap_mode="r").shape == (42, 28, 28, 1)

    run(main_args("eval", workdir, root, *folder, "--config.eval.begin_ckpt=1",
                  "--config.eval.end_ckpt=1", "--config.eval.enable_loss=True",
                  "--config.eval.enable_sampling=False"))
    losses = np.load(os.path.join(workdir, "eval", "ckpt_1_loss.npz"))
    assert len(losses["all_losses"]) == 10 // 8 and np.isfinite(losses["mean_loss"])

    run(main_args("sample", workdir, root, *folder, "--config.sample.num_samples=8"))
    samples = np.load(os.path.join(workdir, "sample", "ckpt_1", "samples.npz"))["samples"]
    assert samples.shape == (8, 28, 28, 1) and samples.dtype == np.uint8

    proc = run(main_args("train_classifier", workdir, root, *folder,
                         "--config.classifier.n_iters=3", "--config.classifier.eval_freq=3"))
    assert os.path.isfile(os.path.join(workdir, "classifier", "summary.json"))
    assert "32 training images" in proc.stderr
    # Every run read the images from the one cache written by the first.
    assert [n for n in os.listdir(cache) if n.endswith(".npy")] == [npy]
    assert os.stat(os.path.join(cache, npy)).st_mtime_ns == stamp
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["data"]["cache_dir"] == cache


def test_training_pipeline_position_saves_and_restores(tmp_path):
    # run_lib.checkpoints saves each host's pipeline position with tf.train.Checkpoint; a
    # resumed run must continue with the batches an uninterrupted one would have read.
    import tensorflow as tf

    root = write_folder(tmp_path / "data", copies=2)
    config = make_config(root, tmp_path / "cache", random_flip=True)
    config.training.batch_size = 3
    first = iter(datasets.get_dataset(config)[0])
    for _ in range(5):  # past the first epoch of 14 images
        first.get_next()
    tf.train.Checkpoint(iterator=first).write(str(tmp_path / "state" / "pipeline"))
    expected = [first.get_next()["image"].numpy() for _ in range(12)]  # two more epochs
    second = iter(datasets.get_dataset(config)[0])
    tf.train.Checkpoint(iterator=second).read(str(tmp_path / "state" / "pipeline")) \
        .assert_consumed()
    for want in expected:
        np.testing.assert_array_equal(second.get_next()["image"].numpy(), want)


def test_fid_stats_file_names_one_folder():
    import evaluation

    config = make_config("/data/faces", "/tmp/cache", image_size=64)
    config.eval = ml_collections.ConfigDict(dict(stats_dir="/stats"))
    path = evaluation.dataset_stats_path(config)
    assert os.path.dirname(path) == "/stats"
    assert os.path.basename(path).startswith("folder_faces_") and path.endswith("_64_stats.npz")
    config.data.data_dir = "/data/cars"
    assert evaluation.dataset_stats_path(config) != path  # another folder, another file
    config.data.data_dir, config.data.num_channels = "/data/faces", 1
    assert evaluation.dataset_stats_path(config) != path  # grey: other statistics
    config.data.dataset = "tfds:lsun/tower"
    assert evaluation.dataset_stats_path(config) == "/stats/tfds_lsun_tower_64_stats.npz"
