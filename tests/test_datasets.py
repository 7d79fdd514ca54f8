"""Tests for datasets.py: shapes, value ranges, flips, dequantization, IDX/TFRecord sources,
sharding and errors. tfds data sets are mocked (tfds.testing.mock_data); Fashion-MNIST is read
from the real IDX files of Debian's `dataset-fashion-mnist` (required: CI installs it)."""

from __future__ import annotations

import dataclasses
import gzip
import os
from unittest import mock

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

import datasets

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def make_config(
    name="CIFAR10",
    image_size=32,
    batch_size=4,
    eval_batch_size=4,
    n_jitted_steps=2,
    random_flip=False,
    data_dir=None,
    tfrecords_path=None,
    num_channels=None,
    seed=42,
    category="bedroom",
):
    if num_channels is None:
        num_channels = 1 if name in ("MNIST", "FashionMNIST") else 3
    config = ml_collections.ConfigDict()
    config.seed = seed
    config.data = ml_collections.ConfigDict(
        dict(
            dataset=name,
            image_size=image_size,
            random_flip=random_flip,
            centered=False,
            uniform_dequantization=False,
            num_channels=num_channels,
            data_dir=data_dir,
            tfrecords_path=tfrecords_path,
            category=category,
        )
    )
    config.training = ml_collections.ConfigDict(
        dict(batch_size=batch_size, n_jitted_steps=n_jitted_steps)
    )
    config.eval = ml_collections.ConfigDict(dict(batch_size=eval_batch_size))
    return config


@pytest.fixture(autouse=True)
def small_shuffle_buffer(monkeypatch):
    # Filling a 10000-element buffer from tiny mock data would dominate the test time.
    monkeypatch.setattr(datasets, "SHUFFLE_BUFFER_SIZE", 16)


def take(ds, n=None):
    """The first n batches as numpy; n=None: up to 2000 (the tests then check the exact count,
    so a pipeline that repeats fails instead of hanging)."""
    return [jax.tree.map(np.asarray, b) for b in ds.take(2000 if n is None else n)]


# ----------------------------------------------------------------------------- scalers


@pytest.mark.parametrize("centered", [False, True])
def test_scaler_round_trip(centered):
    config = make_config()
    config.data.centered = centered
    x = np.random.default_rng(0).uniform(size=(2, 4, 4, 3)).astype(np.float32)
    scaled = datasets.get_data_scaler(config)(x)
    np.testing.assert_allclose(scaled, 2 * x - 1 if centered else x, atol=1e-7)
    np.testing.assert_allclose(datasets.get_data_inverse_scaler(config)(scaled), x, atol=1e-7)
    edges = datasets.get_data_scaler(config)(np.array([0.0, 1.0]))
    np.testing.assert_array_equal(edges, [-1.0, 1.0] if centered else [0.0, 1.0])


# ----------------------------------------------------------------------------- mocked tfds


@pytest.mark.parametrize("name,size", [("CIFAR10", 32), ("SVHN", 16)])
def test_tfds_shapes_range_and_dtype(name, size):
    with tfds.testing.mock_data(num_examples=10):
        config = make_config(name, image_size=size, batch_size=4, n_jitted_steps=3)
        train_ds, eval_ds, builder = datasets.get_dataset(config)
        assert isinstance(builder, tfds.core.DatasetBuilder)
        for ds in (train_ds, eval_ds):
            for batch in take(ds, 5):  # 5 x 12 > 10 examples: the training pipelines repeat
                assert batch["image"].shape == (3, 4, size, size, 3)
                assert batch["image"].dtype == np.float32
                assert batch["label"].shape == (3, 4)
                assert batch["label"].dtype == np.int32
                assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
                assert np.all((batch["label"] >= 0) & (batch["label"] < 10))

        train_ds, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
        for ds in (train_ds, eval_ds):
            batches = take(ds)
            assert len(batches) == 10 // 4  # one pass, remainder dropped
            for batch in batches:
                assert batch["image"].shape == (4, size, size, 3)
                assert batch["label"].shape == (4,)


def test_cifar10_evaluation_is_raw_data_in_order():
    with tfds.testing.mock_data(num_examples=8):
        raw = list(tfds.builder("cifar10").as_dataset(split="test").as_numpy_iterator())
        _, eval_ds, _ = datasets.get_dataset(make_config(eval_batch_size=4), evaluation=True)
        images = np.concatenate([b["image"] for b in take(eval_ds)])
    expected = np.stack([r["image"] for r in raw]).astype(np.float32) / 255.0
    np.testing.assert_array_equal(images, expected)


def test_uniform_dequantization():
    with tfds.testing.mock_data(num_examples=8):
        config = make_config(eval_batch_size=4)
        _, plain, _ = datasets.get_dataset(config, evaluation=True)
        _, deq, _ = datasets.get_dataset(config, uniform_dequantization=True, evaluation=True)
        _, deq_again, _ = datasets.get_dataset(config, uniform_dequantization=True, evaluation=True)
        config.seed = 7
        _, deq_other, _ = datasets.get_dataset(config, uniform_dequantization=True, evaluation=True)
        x, v, v2, v3 = (
            np.concatenate([b["image"] for b in take(d)])
            for d in (plain, deq, deq_again, deq_other)
        )
    # v = (U + 255 x) / 256, so 256 v - 255 x recovers U ~ U[0, 1).
    u = 256.0 * v.astype(np.float64) - 255.0 * x.astype(np.float64)
    assert u.min() >= -1e-4 and u.max() < 1.0 + 1e-4
    assert abs(u.mean() - 0.5) < 0.02 and abs(u.std() - np.sqrt(1 / 12)) < 0.02
    # Fresh noise per image: E|U1 - U2| = 1/3 for independent uniforms.
    assert abs(np.abs(u[0] - u[1]).mean() - 1 / 3) < 0.03
    assert 0.0 <= v.min() and v.max() < 1.0
    # Off the 1/255 grid of 8-bit data almost everywhere.
    off_grid = np.abs(255.0 * v - np.round(255.0 * v)) > 1e-3
    assert off_grid.mean() > 0.95
    np.testing.assert_array_equal(v, v2)  # reproducible for a fixed seed
    assert np.abs(v - v3).mean() > 1e-3  # and keyed by config.seed


def _asymmetric_as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    """Images bright on the left half and dark on the right: a flip is visible."""
    del self, split, decoders, read_config, kwargs
    img = np.full((32, 32, 3), 10, np.uint8)
    img[:, :16] = 200
    return tf.data.Dataset.from_tensor_slices(
        {"image": np.repeat(img[None], 8, axis=0), "label": np.arange(8, dtype=np.int64)}
    )


def _flipped(images):
    """Boolean per image: True where the bright half is on the right."""
    left = images[..., :16, :].mean(axis=(-3, -2))
    right = images[..., 16:, :].mean(axis=(-3, -2))
    assert np.all(np.abs(left - right) > 0.5)  # exactly one of the two orientations
    return (right > left).ravel()


def test_flips_only_on_training_split():
    with tfds.testing.mock_data(as_dataset_fn=_asymmetric_as_dataset):
        config = make_config(random_flip=True, batch_size=4, n_jitted_steps=2)
        train_ds, eval_ds, _ = datasets.get_dataset(config)
        train_flips = np.concatenate([_flipped(b["image"]) for b in take(train_ds, 4)])
        # 32 fair coin flips: all equal with probability 2^-31.
        assert train_flips.any() and not train_flips.all()
        assert not np.concatenate([_flipped(b["image"]) for b in take(eval_ds, 4)]).any()

        for ds in datasets.get_dataset(config, evaluation=True)[:2]:
            assert not np.concatenate([_flipped(b["image"]) for b in take(ds)]).any()

        config.data.random_flip = False
        train_ds, _, _ = datasets.get_dataset(config)
        assert not np.concatenate([_flipped(b["image"]) for b in take(train_ds, 4)]).any()


def test_training_pipeline_reproducible_and_seeded():
    with tfds.testing.mock_data(num_examples=16):
        config = make_config(random_flip=True)
        first = take(datasets.get_dataset(config)[0], 3)
        again = take(datasets.get_dataset(config)[0], 3)
        config.seed = 1
        other = take(datasets.get_dataset(config)[0], 3)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert any(
        not np.array_equal(a["image"], c["image"]) for a, c in zip(first, other, strict=True)
    )


@pytest.mark.parametrize("name,size", [("CELEBA", 64), ("LSUN", 128), ("LSUN", 64)])
def test_crop_resize_datasets_shapes(name, size):
    with tfds.testing.mock_data(num_examples=2):
        config = make_config(name, image_size=size, eval_batch_size=2)
        for ds in datasets.get_dataset(config, evaluation=True)[:2]:
            (batch,) = take(ds)
            assert batch["image"].shape == (2, size, size, 3)
            assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
            np.testing.assert_array_equal(batch["label"], [datasets.NO_LABEL] * 2)


# ----------------------------------------------------------------------------- Fashion-MNIST


def _raw_idx(path, header_bytes):
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), np.uint8, offset=header_bytes)


@pytest.fixture(scope="module")
def fmnist_raw():
    # A missing directory must fail the suite, not skip it: CI installs the package.
    assert os.path.isdir(FMNIST_DIR), f"{FMNIST_DIR} missing: apt-get install dataset-fashion-mnist"
    return {
        split: (
            _raw_idx(f"{FMNIST_DIR}/{split}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28),
            _raw_idx(f"{FMNIST_DIR}/{split}-labels-idx1-ubyte.gz", 8),
        )
        for split in ("train", "t10k")
    }


def test_fashion_mnist_evaluation_matches_idx_bytes(fmnist_raw):
    config = make_config("FashionMNIST", image_size=28, eval_batch_size=8, data_dir=FMNIST_DIR)
    train_ds, eval_ds, source = datasets.get_dataset(config, evaluation=True)
    assert source.num_examples == {"train": 60000, "test": 10000}
    for ds, split in ((train_ds, "train"), (eval_ds, "t10k")):
        images, labels = fmnist_raw[split]
        got = take(ds, 2)
        img = np.concatenate([b["image"] for b in got])
        lab = np.concatenate([b["label"] for b in got])
        assert img.shape == (16, 28, 28, 1) and img.dtype == np.float32
        np.testing.assert_array_equal(img[..., 0], images[:16].astype(np.float32) / 255.0)
        np.testing.assert_array_equal(lab, labels[:16])
    all_labels = np.concatenate([b["label"] for b in take(eval_ds)])
    assert all_labels.shape == (10000,)  # 10000 / 8: one full pass, nothing dropped
    np.testing.assert_array_equal(np.bincount(all_labels, minlength=10), [1000] * 10)


def test_fashion_mnist_32px_zero_padding(fmnist_raw):
    config = make_config(
        "FashionMNIST", image_size=32, batch_size=4, eval_batch_size=4, data_dir=FMNIST_DIR
    )
    train_ds, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
    images, _ = fmnist_raw["t10k"]
    (batch,) = take(eval_ds, 1)
    img = batch["image"][..., 0]
    assert img.shape == (4, 32, 32)
    np.testing.assert_array_equal(img[:, 2:30, 2:30], images[:4].astype(np.float32) / 255.0)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(img[:, border] == 0.0)

    train_ds, eval_ds, _ = datasets.get_dataset(config)
    for ds in (train_ds, eval_ds):
        (batch,) = take(ds, 1)
        assert batch["image"].shape == (2, 4, 32, 32, 1)
        assert batch["label"].shape == (2, 4)
        assert np.all((batch["label"] >= 0) & (batch["label"] <= 9))
        assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0


def test_fashion_mnist_host_shards(fmnist_raw, monkeypatch):
    images, _ = fmnist_raw["t10k"]
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    config = make_config("FashionMNIST", image_size=28, eval_batch_size=4, data_dir=FMNIST_DIR)
    for host in (0, 1):
        monkeypatch.setattr(jax, "process_index", lambda host=host: host)
        _, eval_ds, source = datasets.get_dataset(config, evaluation=True)
        assert source.num_examples == {"train": 30000, "test": 5000}
        (batch,) = take(eval_ds, 1)
        assert batch["image"].shape == (2, 28, 28, 1)  # per-host half of the global batch
        expected = images[host * 5000 : host * 5000 + 2].astype(np.float32) / 255.0
        np.testing.assert_array_equal(batch["image"][..., 0], expected)


# ----------------------------------------------------------------------------- local files


def _write_idx(path, array, type_code):
    dtype = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}[type_code]
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + np.asarray(array, dtype).tobytes()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize(
    "type_code,dtype", [(0x08, np.uint8), (0x0C, np.int32), (0x0D, np.float32)]
)
def test_read_idx_round_trip(tmp_path, suffix, type_code, dtype):
    rng = np.random.default_rng(type_code)
    array = (
        rng.uniform(-1000, 1000, size=(5, 3, 7))
        if dtype != np.uint8
        else rng.integers(0, 256, size=(5, 3, 7))
    ).astype(dtype)
    path = str(tmp_path / f"a-idx3{suffix}")
    _write_idx(path, array, type_code)
    out = datasets.read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.shape == (5, 3, 7)
    np.testing.assert_array_equal(out, array)

    labels = rng.integers(0, 10, size=11).astype(np.uint8)
    _write_idx(str(tmp_path / f"l-idx1{suffix}"), labels, 0x08)
    np.testing.assert_array_equal(datasets.read_idx(str(tmp_path / f"l-idx1{suffix}")), labels)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        datasets.read_idx(str(tmp_path / "bad"))
    _write_idx(str(tmp_path / "short"), np.zeros((4, 2), np.uint8), 0x08)
    (tmp_path / "short").write_bytes((tmp_path / "short").read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"shape \(4, 2\)"):
        datasets.read_idx(str(tmp_path / "short"))


def _write_mnist_dir(path, n_train=6, n_test=5, gz=False):
    rng = np.random.default_rng(0)
    data = {}
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        _write_idx(str(path / f"{split}-images-idx3-ubyte{ext}"), images, 0x08)
        _write_idx(str(path / f"{split}-labels-idx1-ubyte{ext}"), labels, 0x08)
        data[split] = (images, labels)
    return data


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_from_local_idx_files(tmp_path, gz):
    data = _write_mnist_dir(tmp_path, gz=gz)
    config = make_config("MNIST", image_size=28, eval_batch_size=2, data_dir=str(tmp_path))
    train_ds, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
    for ds, split, n_batches in ((train_ds, "train", 3), (eval_ds, "t10k", 2)):
        batches = take(ds)
        assert len(batches) == n_batches
        images, labels = data[split]
        n = 2 * n_batches
        np.testing.assert_array_equal(
            np.concatenate([b["image"] for b in batches])[..., 0],
            images[:n].astype(np.float32) / 255.0,
        )
        np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels[:n])


def _write_tfrecords(path, chw_images, shape=None, keys=("shape", "data")):
    """Records as the progressive-GAN dataset_tool writes them; `shape` overrides the stored
    shape and `keys` selects the features written (to make damaged files)."""
    with tf.io.TFRecordWriter(path) as writer:
        for img in chw_images:
            feature = {
                "shape": tf.train.Feature(
                    int64_list=tf.train.Int64List(value=img.shape if shape is None else shape)
                ),
                "data": tf.train.Feature(bytes_list=tf.train.BytesList(value=[img.tobytes()])),
            }
            feature = {k: v for k, v in feature.items() if k in keys}
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            writer.write(example.SerializeToString())


def test_tfrecords_source(tmp_path):
    rng = np.random.default_rng(0)
    chw = rng.integers(0, 256, size=(5, 3, 8, 8)).astype(np.uint8)
    path = str(tmp_path / "ffhq-r03.tfrecords")
    _write_tfrecords(path, chw)
    config = make_config("FFHQ", image_size=8, eval_batch_size=2, tfrecords_path=path)
    _, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
    batches = take(eval_ds)
    assert len(batches) == 2
    expected = chw[:4].transpose(0, 2, 3, 1).astype(np.float32) / 255.0
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), expected)
    np.testing.assert_array_equal(batches[0]["label"], [datasets.NO_LABEL] * 2)

    train_ds, _, _ = datasets.get_dataset(make_config("FFHQ", image_size=4, tfrecords_path=path))
    (batch,) = take(train_ds, 1)
    assert batch["image"].shape == (2, 4, 4, 4, 3)


# ----------------------------------------------------------------------------- errors


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown dataset 'CIFAR100'.*CIFAR10.*FashionMNIST"):
        datasets.get_dataset(make_config("CIFAR100"))


def test_missing_tfds_data(tmp_path):
    config = make_config("CIFAR10", data_dir=str(tmp_path / "tfds"))
    with pytest.raises(FileNotFoundError, match=r"tfds build cifar10") as info:
        datasets.get_dataset(config)
    assert str(tmp_path / "tfds" / "cifar10") in str(info.value)


def test_missing_fashion_mnist_mentions_apt_package(tmp_path):
    config = make_config("FashionMNIST", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"apt-get install dataset-fashion-mnist"):
        datasets.get_dataset(config)


def test_incomplete_idx_dir(tmp_path):
    _write_mnist_dir(tmp_path)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    config = make_config("MNIST", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"lacks t10k-labels-idx1-ubyte\[\.gz\]"):
        datasets.get_dataset(config)


def test_missing_tfrecords(tmp_path):
    config = make_config("CelebAHQ", tfrecords_path=str(tmp_path / "none-*.tfrecords"))
    with pytest.raises(FileNotFoundError, match=r"no TFRecord files at config.data.tfrecords_path"):
        datasets.get_dataset(config)


def test_num_channels_mismatch():
    with pytest.raises(ValueError, match=r"num_channels=3 but FashionMNIST has 1"):
        datasets.get_dataset(make_config("FashionMNIST", num_channels=3, data_dir=FMNIST_DIR))


def test_batch_not_divisible_by_devices(monkeypatch, tmp_path):
    monkeypatch.setattr(jax, "device_count", lambda: 3)
    # The check comes before any data access: the data dir does not even exist.
    config = make_config(batch_size=4, eval_batch_size=6, data_dir=str(tmp_path / "none"))
    message = r"config.{}={} must be a positive multiple of the device count 3 \(and of the"
    with pytest.raises(ValueError, match=message.format("training.batch_size", 4)):
        datasets.get_dataset(config)
    config.eval.batch_size = 8
    with pytest.raises(ValueError, match=message.format("eval.batch_size", 8)):
        datasets.get_dataset(config, evaluation=True)


def test_unknown_lsun_category_lists_valid_ones():
    with pytest.raises(ValueError, match=r"category='kitchenette' .*valid: .*bedroom.*tower"):
        datasets.get_dataset(make_config("LSUN", category="kitchenette"))


# ----------------------------------------------------------------------------- spec registry


BUILTINS = ["CELEBA", "CIFAR10", "CelebAHQ", "FFHQ", "FashionMNIST", "LSUN", "MNIST", "SVHN"]


def test_registry_specs():
    assert sorted(datasets.DATASETS) == sorted([*BUILTINS, "folder", "tfds:"])
    assert "CIFAR10" in datasets.DATASETS and "CIFAR100" not in datasets.DATASETS
    for name in BUILTINS:
        spec = datasets.DATASETS[name]
        assert spec.name == name and datasets.get_spec(name) is spec
        assert spec.channels == (1 if "MNIST" in name else 3)
        tfds_name = getattr(spec.load, "tfds_name", None)
        assert (tfds_name is None) == isinstance(spec.load, datasets.TfrecordsLoader)
        if tfds_name is not None:  # a name tfds knows (offline: only the code is looked up)
            family = tfds_name.split("/")[0]
            assert tfds.builder_cls(family).name == family
    assert datasets.DATASETS["folder"].channels is None  # follows config.data.num_channels
    assert datasets.get_spec("tfds:cifar100") is datasets.DATASETS["tfds:"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        datasets.DATASETS["CIFAR10"].channels = 1
    with pytest.raises(TypeError):  # read-only: the registry is changed by registering
        datasets.DATASETS["x"] = datasets.DATASETS["CIFAR10"]
    for bad in ("tfds:", "folder2", "cifar10"):
        with pytest.raises(ValueError, match=r"Unknown dataset .*valid names: .*folder, "
                                             r"tfds:<name>"):
            datasets.get_spec(bad)


@pytest.mark.parametrize("name", BUILTINS)
@pytest.mark.parametrize("size", [16, 32, 64])
def test_preprocess_shape_and_range(name, size):
    spec = datasets.DATASETS[name]
    hw = spec.native_size or (200, 150)  # LSUN and TFRecords: any size
    rng = np.random.default_rng(size)
    img = tf.constant(rng.integers(0, 256, size=(*hw, spec.channels)).astype(np.uint8))
    out = spec.preprocess(img, size).numpy()
    assert out.shape == (size, size, spec.channels) and out.dtype == np.float32
    assert 0.0 <= out.min() and out.max() <= 1.0


# ----------------------------------------------------------------------------- downloads


def test_download_only_when_switched_on():
    with tfds.testing.mock_data(num_examples=4):
        with mock.patch.object(
            tfds.core.DatasetBuilder, "download_and_prepare", autospec=True
        ) as download:
            config = make_config(eval_batch_size=2)
            datasets.get_dataset(config, evaluation=True)
            assert download.call_count == 0  # off by default
            config.data.download = False
            datasets.get_dataset(config, evaluation=True)
            assert download.call_count == 0
            config.data.download = True
            datasets.get_dataset(config, evaluation=True)
            assert download.call_count == 1
            assert download.call_args.args[0].name == "cifar10"
            config.data.download = False
            datasets.get_dataset(config, evaluation=True, download=True)  # the argument too
            assert download.call_count == 2


def test_offline_error_names_download_switch(tmp_path):
    config = make_config("SVHN", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"tfds build svhn_cropped") as info:
        datasets.get_dataset(config)
    assert "--config.data.download=True" in str(info.value)


# ----------------------------------------------------------------------------- damaged files


def _damage_idx(path, damage):
    """Damages the train images file of a gzip MNIST folder at `path`; returns the file(s) the
    error must name."""
    images = path / "train-images-idx3-ubyte.gz"
    labels = path / "train-labels-idx1-ubyte.gz"
    if damage == "unreadable":
        os.chmod(images, 0)
    elif damage == "truncated_gzip":
        images.write_bytes(images.read_bytes()[:-200])
    elif damage == "not_gzip":
        _write_idx(str(path / "plain"), np.zeros((6, 28, 28), np.uint8), 0x08)
        os.replace(path / "plain", images)
    elif damage == "bad_magic":
        images.write_bytes(gzip.compress(b"PK\x03\x04" + bytes(100)))
    elif damage == "count_mismatch":
        _write_idx(str(labels), np.zeros(4, np.uint8), 0x08)
        return [str(images), str(labels), "6 images", "4 labels"]
    elif damage == "rank":
        _write_idx(str(images), np.zeros((6, 28, 28, 1), np.uint8), 0x08)
    elif damage == "label_rank":
        _write_idx(str(labels), np.zeros((6, 2), np.uint8), 0x08)
        return [str(labels)]
    return [str(images)]


@pytest.mark.parametrize(
    "damage,reason",
    [
        ("unreadable", r"cannot be read \(Permission denied\)"),
        ("truncated_gzip", r"gzip stream is truncated or corrupt"),
        ("not_gzip", r"not a valid gzip file"),
        ("bad_magic", r"is not an IDX file \(bad magic number b'PK\\x03\\x04'\)"),
        ("count_mismatch", r"holds 6 images but .* holds 4 labels"),
        ("rank", r"expected uint8 images \[N, H, W\], got uint8 \[6, 28, 28, 1\]"),
        ("label_rank", r"expected labels \[N\], got shape \[6, 2\]"),
    ],
)
def test_damaged_idx_file_gives_one_clear_error(tmp_path, monkeypatch, damage, reason):
    _write_mnist_dir(tmp_path, gz=True)
    named = _damage_idx(tmp_path, damage)
    if damage == "unreadable" and os.access(named[0], os.R_OK):
        # Root reads any file; make the read fail as it would for anyone else.
        real_open = gzip.open

        def denied(path, *args, **kwargs):
            if path == named[0]:
                raise PermissionError(13, "Permission denied", path)
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(gzip, "open", denied)
    config = make_config("MNIST", image_size=28, data_dir=str(tmp_path))
    with pytest.raises(datasets.DataError, match=reason) as info:
        datasets.get_dataset(config)  # raised while building, before any batch is read
    for text in named:
        assert text in str(info.value)


def _damage_tfrecords(path, damage):
    """Writes a damaged `path` (3-channel 8x8 FFHQ records, unless the damage is the channels)."""
    chw = np.random.default_rng(0).integers(0, 256, size=(3, 3, 8, 8)).astype(np.uint8)
    if damage == "corrupt":
        _write_tfrecords(path, chw)
        data = bytearray(open(path, "rb").read())
        data[:8] = b"\xff" * 8  # the length field of the first record
        open(path, "wb").write(bytes(data))
    elif damage == "not_records":
        open(path, "wb").write(b"\x89PNG\r\n\x1a\n" + bytes(100))
    elif damage == "directory":
        os.mkdir(path)
    elif damage == "empty":
        open(path, "wb").close()
    elif damage == "no_shape":
        _write_tfrecords(path, chw, keys=("data",))
    elif damage == "shape_vs_data":
        _write_tfrecords(path, chw, shape=(3, 8, 9))
    elif damage == "channels":
        _write_tfrecords(path, chw[:, :1])


@pytest.mark.parametrize(
    "damage,reason",
    [
        ("corrupt", r"cannot be read as TFRecords \(.*corrupted record"),
        ("not_records", r"cannot be read as TFRecords \(.*corrupted record"),
        ("directory", r"cannot be read as TFRecords \(.*Is a directory"),
        ("empty", r"holds no records"),
        ("no_shape", r"records lack the feature\(s\) \['shape'\] \(have \['data'\]\)"),
        ("shape_vs_data", r"`shape` \[3, 8, 9\] does not match its `data` \(192 bytes\)"),
        ("channels", r"\[C, H, W\] = \[1, 8, 8\] have 1 channel\(s\); expected 3"),
    ],
)
def test_damaged_tfrecords_give_one_clear_error(tmp_path, damage, reason):
    good = str(tmp_path / "a.tfrecords")
    _write_tfrecords(good, np.zeros((2, 3, 8, 8), np.uint8))
    bad = str(tmp_path / "b.tfrecords")
    _damage_tfrecords(bad, damage)
    config = make_config("FFHQ", image_size=8, tfrecords_path=str(tmp_path / "*.tfrecords"))
    with pytest.raises(datasets.DataError, match=reason) as info:
        datasets.get_dataset(config)
    assert str(info.value).startswith(bad + ":")
    assert "{{" not in str(info.value) and "[Op:" not in str(info.value)
