"""Tests for the evaluation package: FID Inception port, weight files, FID / KID / IS,
stats files.

Genuine PyTorch fixtures come from tests/fixtures/make_torch_fixtures.py (run once with
PyTorch in a throwaway venv); the project itself never imports torch.
"""

import contextlib
import functools
import importlib.util
import io
import os
import pickle
import struct
import sys
import tracemalloc
import urllib.error
import zipfile
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.linalg
import torch_pickle_writer as tw

import evaluation as ev

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _load_fixture_module():
    spec = importlib.util.spec_from_file_location(
        "make_torch_fixtures", os.path.join(FIXTURES, "make_torch_fixtures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------------
# Architecture: a hand-written table from torchvision's Inception3 / pytorch-fid facts
# --------------------------------------------------------------------------------------


def _architecture_table():
    """(name, in_channels, out_channels, kh, kw) of every BasicConv2d, from the spec."""
    convs = [("Conv2d_1a_3x3", 3, 32, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3),
             ("Conv2d_2b_3x3", 32, 64, 3, 3), ("Conv2d_3b_1x1", 64, 80, 1, 1),
             ("Conv2d_4a_3x3", 80, 192, 3, 3)]

    def a(n, cin, pool):
        return [(f"{n}.branch1x1", cin, 64, 1, 1), (f"{n}.branch5x5_1", cin, 48, 1, 1),
                (f"{n}.branch5x5_2", 48, 64, 5, 5), (f"{n}.branch3x3dbl_1", cin, 64, 1, 1),
                (f"{n}.branch3x3dbl_2", 64, 96, 3, 3), (f"{n}.branch3x3dbl_3", 96, 96, 3, 3),
                (f"{n}.branch_pool", cin, pool, 1, 1)]

    def b(n, cin):
        return [(f"{n}.branch3x3", cin, 384, 3, 3), (f"{n}.branch3x3dbl_1", cin, 64, 1, 1),
                (f"{n}.branch3x3dbl_2", 64, 96, 3, 3), (f"{n}.branch3x3dbl_3", 96, 96, 3, 3)]

    def c(n, c7):
        return [(f"{n}.branch1x1", 768, 192, 1, 1), (f"{n}.branch7x7_1", 768, c7, 1, 1),
                (f"{n}.branch7x7_2", c7, c7, 1, 7), (f"{n}.branch7x7_3", c7, 192, 7, 1),
                (f"{n}.branch7x7dbl_1", 768, c7, 1, 1), (f"{n}.branch7x7dbl_2", c7, c7, 7, 1),
                (f"{n}.branch7x7dbl_3", c7, c7, 1, 7), (f"{n}.branch7x7dbl_4", c7, c7, 7, 1),
                (f"{n}.branch7x7dbl_5", c7, 192, 1, 7), (f"{n}.branch_pool", 768, 192, 1, 1)]

    def d(n):
        return [(f"{n}.branch3x3_1", 768, 192, 1, 1), (f"{n}.branch3x3_2", 192, 320, 3, 3),
                (f"{n}.branch7x7x3_1", 768, 192, 1, 1), (f"{n}.branch7x7x3_2", 192, 192, 1, 7),
                (f"{n}.branch7x7x3_3", 192, 192, 7, 1), (f"{n}.branch7x7x3_4", 192, 192, 3, 3)]

    def e(n, cin):
        return [(f"{n}.branch1x1", cin, 320, 1, 1), (f"{n}.branch3x3_1", cin, 384, 1, 1),
                (f"{n}.branch3x3_2a", 384, 384, 1, 3), (f"{n}.branch3x3_2b", 384, 384, 3, 1),
                (f"{n}.branch3x3dbl_1", cin, 448, 1, 1), (f"{n}.branch3x3dbl_2", 448, 384, 3, 3),
                (f"{n}.branch3x3dbl_3a", 384, 384, 1, 3),
                (f"{n}.branch3x3dbl_3b", 384, 384, 3, 1), (f"{n}.branch_pool", cin, 192, 1, 1)]

    convs += a("Mixed_5b", 192, 32) + a("Mixed_5c", 256, 64) + a("Mixed_5d", 288, 64)
    convs += b("Mixed_6a", 288)
    convs += c("Mixed_6b", 128) + c("Mixed_6c", 160) + c("Mixed_6d", 160) + c("Mixed_6e", 192)
    convs += d("Mixed_7a")
    convs += e("Mixed_7b", 1280) + e("Mixed_7c", 2048)
    return convs


def _expected_state_dict_shapes():
    shapes = {}
    for name, cin, cout, kh, kw in _architecture_table():
        shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw)
        for leaf in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.bn.{leaf}"] = (cout,)
    shapes["fc.weight"] = (1008, 2048)
    shapes["fc.bias"] = (1008,)
    return shapes


def test_state_dict_layout_matches_architecture_table():
    table = _architecture_table()
    # 5 stem convs, 3 InceptionA (7), InceptionB (4), 4 InceptionC (10), InceptionD (6),
    # 2 InceptionE (9).
    assert len(table) == 5 + 3 * 7 + 4 + 4 * 10 + 6 + 2 * 9 == 94
    expected = _expected_state_dict_shapes()
    assert len(expected) == 94 * 5 + 2 == 472
    got = ev.torch_state_dict_shapes()
    assert got == expected
    assert ev.torch_state_dict_keys() == sorted(expected)


def test_parameter_count_matches_torchvision_figure():
    shapes = _expected_state_dict_shapes()
    trainable = sum(int(np.prod(s)) for k, s in shapes.items() if "running" not in k)
    # torchvision documents 27,161,264 parameters for inception_v3 (1000 classes, with
    # the auxiliary head). pytorch-fid drops the aux head and has 1008 classes.
    aux = (768 * 128 + 2 * 128) + (128 * 768 * 5 * 5 + 2 * 768) + (768 * 1000 + 1000)
    assert trainable == 27_161_264 - aux + 8 * 2048 + 8
    abstract = ev.inception_variable_shapes()
    flax_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract["params"]))
    flax_stats = sum(int(np.prod(x.shape))
                     for x in jax.tree_util.tree_leaves(abstract["batch_stats"]))
    assert flax_params == trainable
    bn_channels = sum(cout for _, _, cout, _, _ in _architecture_table())
    assert flax_stats == 2 * bn_channels


def test_output_shapes_for_non_square_input():
    variables = ev.inception_variable_shapes()
    images = jax.ShapeDtypeStruct((3, 17, 40, 3), jnp.uint8)  # resized to 299 inside
    forward = functools.partial(ev.inception.apply, precision=None)
    out = jax.eval_shape(forward, variables, images)
    assert out["pool_3"].shape == (3, 2048) and out["logits"].shape == (3, 1008)
    grey = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)  # float32 is cast inside
    out = jax.eval_shape(forward, variables, grey)
    assert out["pool_3"].shape == (2, 2048) and out["logits"].shape == (2, 1008)


# --------------------------------------------------------------------------------------
# Preprocessing and pooling semantics
# --------------------------------------------------------------------------------------


def test_resize_matches_torch_interpolate():
    data = np.load(os.path.join(FIXTURES, "interp.npz"))
    x = jnp.asarray(data["input"])
    for key in data.files:
        if key.startswith("out_"):
            h, w = map(int, key[4:].split("x"))
            got = np.asarray(ev.resize_bilinear_torch(x, h, w))
            np.testing.assert_allclose(got, data[key], atol=2e-6, err_msg=key)
    for name in ("tall", "wide"):  # 1024 -> 299 and 64 -> 299 along one axis
        want = data[f"{name}_out"]
        got = ev.resize_bilinear_torch(jnp.asarray(data[f"{name}_input"]), *want.shape[1:3])
        np.testing.assert_allclose(np.asarray(got), want, atol=5e-7, err_msg=name)


def test_resize_equals_jax_image_resize_without_antialias():
    rng = np.random.default_rng(1)
    for size in (32, 1024):
        x = jnp.asarray(rng.uniform(0, 1, (1, size, size, 3)).astype(np.float32))
        ours = np.asarray(ev.resize_bilinear_torch(x, 299, 299))
        plain = np.asarray(jax.image.resize(x, (1, 299, 299, 3), "bilinear", antialias=False))
        # Same interpolation; jax rounds its float32 sample positions differently.
        np.testing.assert_allclose(ours, plain, atol=1e-4)
        if size > 299:  # the default antialiased resize is not what pytorch-fid does
            smooth = np.asarray(jax.image.resize(x, (1, 299, 299, 3), "bilinear"))
            assert np.abs(ours - smooth).max() > 0.1


def test_preprocess_range_and_identity_at_299():
    images = np.zeros((1, 299, 299, 3), np.uint8)
    images[0, :, :150] = 255
    x = np.asarray(ev.preprocess_images(jnp.asarray(images)))
    assert x.shape == (1, 299, 299, 3)
    np.testing.assert_array_equal(np.unique(x), [-1.0, 1.0])


def test_bilinear_matrix_rows_sum_to_one():
    for n_in, n_out in ((32, 299), (1024, 299), (5, 5), (1, 7)):
        m = ev.bilinear_resize_matrix(n_in, n_out)
        np.testing.assert_allclose(m.sum(1), 1.0)
    np.testing.assert_array_equal(ev.bilinear_resize_matrix(6, 6), np.eye(6))


def test_avg_pool_excludes_padding():
    x = np.random.default_rng(2).normal(size=(1, 4, 5, 2)).astype(np.float32)
    got = np.asarray(ev.inception._avg_pool_3x3_same(jnp.asarray(x)))
    want = np.zeros_like(x)
    for i in range(4):
        for j in range(5):
            window = x[0, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2]
            want[0, i, j] = window.mean(axis=(0, 1))  # mean over real pixels only
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_max_pool_pads_with_minus_infinity():
    x = -np.ones((1, 3, 3, 1), np.float32)
    np.testing.assert_array_equal(np.asarray(ev.inception._max_pool(jnp.asarray(x), 1, pad=1)), x)


def test_images_to_uint8_truncates_like_score_sde():
    x = np.array([-0.1, 0.0, 0.5, 0.999, 1.0, 1.2])
    np.testing.assert_array_equal(ev.images_to_uint8(x), [0, 0, 127, 254, 255, 255])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_images_to_uint8_is_the_reference_rule(dtype):
    # score_sde: np.clip(x * 255, 0, 255).astype(np.uint8), i.e. truncation, by hand:
    # 0.999 -> 0, 1.999 -> 1, 254.5 -> 254 (rounding would give 1, 2, 254 or 255),
    # below 0 -> 0, above 1 -> 255.
    x = np.array([0.999 / 255, 1.999 / 255, 254.5 / 255, 254.999 / 255, -0.1, 1.2,
                  128 / 255], dtype)
    got = ev.images_to_uint8(x.reshape(1, 7, 1, 1))
    assert got.dtype == np.uint8 and got.shape == (1, 7, 1, 1)
    np.testing.assert_array_equal(got.ravel(), [0, 1, 254, 254, 0, 255, 128])


# --------------------------------------------------------------------------------------
# PyTorch files without torch
# --------------------------------------------------------------------------------------


@pytest.fixture
def no_torch(monkeypatch):
    """Makes `import torch` fail inside the test: the reader must not need it, even where
    torch is installed (the interoperability tests install it)."""
    monkeypatch.setitem(sys.modules, "torch", None)


@pytest.mark.parametrize("name", ["small_zip.pth", "small_legacy.pth"])
def test_loads_genuine_torch_files_exactly(name, no_torch):
    expected = np.load(os.path.join(FIXTURES, "small_expected.npz"))
    sd = ev.load_torch_state_dict(os.path.join(FIXTURES, name))
    assert list(sd) == list(expected.files)
    for key in expected.files:
        assert sd[key].dtype == expected[key].dtype, key
        assert sd[key].shape == expected[key].shape, key
        np.testing.assert_array_equal(sd[key], expected[key], err_msg=key)
    assert sd["bn.num_batches_tracked"].shape == () and sd["bn.num_batches_tracked"] == 7


@pytest.mark.parametrize("legacy", [False, True])
def test_writer_round_trip(tmp_path, legacy):
    base = np.arange(30, dtype=np.float64).reshape(5, 6)
    sd = {"w": np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 2, 2),
          "view": base[1:, ::2].T, "half": np.array([0.5, 65504], np.float16),
          "count.num_batches_tracked": np.array(3, np.int64),
          "mask": np.array([True, False]), "bytes": np.arange(5, dtype=np.uint8)}
    path = tmp_path / "x.pth"
    tw.save_torch_state_dict(path, sd, legacy=legacy)
    out = ev.load_torch_state_dict(path)
    assert list(out) == list(sd)
    for key, value in sd.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape, key
        np.testing.assert_array_equal(out[key], value)
    assert zipfile.is_zipfile(path) != legacy


def test_reads_state_dict_with_metadata_attribute(tmp_path):
    # Module.state_dict() returns an OrderedDict carrying a `_metadata` attribute, which
    # the pickle restores with a BUILD opcode; the loader must accept it.
    import collections
    storage = tw.StorageToPickle("0", np.arange(3, dtype=np.float32))
    sd = collections.OrderedDict(a=tw.TensorToPickle(storage))
    sd._metadata = collections.OrderedDict([("", {"version": 1}), ("bn", {"version": 2})])
    buf = io.BytesIO()
    tw.TorchPickler(buf, legacy=False).dump(sd)
    assert b"_metadata" in buf.getvalue()
    with zipfile.ZipFile(tmp_path / "m.pth", "w") as zf:
        zf.writestr("m/data.pkl", buf.getvalue())
        zf.writestr("m/data/0", storage.array.tobytes())
    out = ev.load_torch_state_dict(tmp_path / "m.pth")
    assert list(out) == ["a"]
    np.testing.assert_array_equal(out["a"], [0, 1, 2])


def _evil_pickle(marker):
    # GLOBAL os.system, then call it: what a malicious "weights" file would do.
    return (b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR.")


def test_refuses_foreign_globals_zip(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", _evil_pickle(marker))
    with pytest.raises(ev.WeightFileError, match="os.system"):
        ev.load_torch_state_dict(path)
    assert not marker.exists()


def test_refuses_foreign_globals_legacy(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    headers = (ev.pth.TORCH_MAGIC_NUMBER, ev.pth.TORCH_LEGACY_PROTOCOL,
               {"little_endian": True})
    for header in headers:
        pickle.dump(header, buf, protocol=2)
    buf.write(_evil_pickle(marker))
    path = tmp_path / "evil.pth"
    path.write_bytes(buf.getvalue())
    with pytest.raises(ev.WeightFileError, match="os.system"):
        ev.load_torch_state_dict(path)
    assert not marker.exists()


def test_refuses_global_inside_state_dict(tmp_path):
    tw.save_torch_state_dict(tmp_path / "ok.pth", {"a": np.zeros(2, np.float32)})
    with zipfile.ZipFile(tmp_path / "ok.pth") as zf:
        pkl = zf.read("archive/data.pkl")
    bad = pkl.replace(b"torch._utils\n_rebuild_tensor_v2", b"builtins\neval")
    assert bad != pkl
    with zipfile.ZipFile(tmp_path / "ok.pth") as ok:
        records = {name: ok.read(name) for name in ok.namelist()}
    with zipfile.ZipFile(tmp_path / "bad.pth", "w") as zf:
        for name, data in records.items():
            zf.writestr(name, bad if name.endswith("data.pkl") else data)
    with pytest.raises(ev.WeightFileError, match="builtins.eval"):
        ev.load_torch_state_dict(tmp_path / "bad.pth")


def test_weight_file_error_is_value_and_unpickling_error():
    assert issubclass(ev.WeightFileError, ValueError)
    assert issubclass(ev.WeightFileError, pickle.UnpicklingError)


def test_refuses_disallowed_numpy_dtype(tmp_path):
    # numpy.dtype('O') would let an object scalar through; only numeric dtypes pass.
    path = tmp_path / "objdtype.pth"
    tw.write_zip(path, b"cnumpy\ndtype\n(VO\nI00\nI01\ntR.", {})
    with pytest.raises(ev.WeightFileError, match="numpy dtype 'O' is not allowed"):
        ev.load_torch_checkpoint(path)


def test_expected_shapes_checked_before_reading(tmp_path):
    path = os.path.join(FIXTURES, "small_zip.pth")
    sd = ev.load_torch_state_dict(path, expected_shapes={"conv.weight": (2, 3, 2, 2)})
    assert sd["conv.weight"].shape == (2, 3, 2, 2)
    with pytest.raises(ev.WeightFileError, match=r"conv.weight: \(2, 3, 2, 2\), expected"):
        ev.load_torch_state_dict(path, expected_shapes={"conv.weight": (3, 2, 2, 2)})
    with pytest.raises(ev.WeightFileError, match="fc.bias: missing"):
        ev.load_torch_state_dict(path, expected_shapes={"fc.bias": (4,)})


# --------------------------------------------------------------------------------------
# General checkpoints: score_sde_pytorch's checkpoint_<k>.pth
# --------------------------------------------------------------------------------------


def test_reads_score_sde_pytorch_checkpoint(no_torch):
    # Written by yang-song/score_sde_pytorch's utils.save_checkpoint (torch 2.x zip):
    # VE NCSN++ continuous, nf=4, num_scales=1000, EMA rate 0.999, two training steps.
    ckpt = ev.load_torch_checkpoint(
        os.path.join(FIXTURES, "score_sde_pytorch_ve_checkpoint_1.pth"))
    assert list(ckpt) == ["optimizer", "model", "ema", "step"] and ckpt["step"] == 2
    model = ckpt["model"]
    sigmas = model["module.sigmas"]  # a float64 buffer, not a parameter
    assert sigmas.shape == (1000,) and sigmas.dtype == np.float64
    assert np.all(np.diff(sigmas) < 0)  # geometric, sigma_max first
    params = [(k, v) for k, v in model.items() if k != "module.sigmas"]
    assert all(k.startswith("module.all_modules.") for k, _ in params)
    assert all(v.dtype == np.float32 for _, v in params)
    assert params[0][0] == "module.all_modules.0.W" and params[0][1].shape == (4,)
    assert len(params) == 217

    ema = ckpt["ema"]
    assert ema["decay"] == pytest.approx(0.999) and ema["num_updates"] == 2
    shadow = ema["shadow_params"]
    # The Fourier features' W has requires_grad=False, so the EMA list skips it: one
    # entry fewer, and entry i is parameter i + 1.
    assert isinstance(shadow, list) and len(shadow) == len(params) - 1
    assert [s.shape for s in shadow] == [v.shape for _, v in params[1:]]
    assert not np.array_equal(shadow[0], params[1][1])  # EMA noise made them differ

    opt = ckpt["optimizer"]
    group = opt["param_groups"][0]
    assert type(group["lr"]) is np.float64 and group["lr"] == pytest.approx(4e-8)
    assert group["betas"] == (0.9, 0.999) and group["params"] == list(range(217))
    assert sorted(opt["state"]) == list(range(1, 217))  # no Adam state for W
    state = opt["state"][1]
    assert state["step"].shape == () and state["step"].dtype == np.float32
    assert state["exp_avg"].shape == params[1][1].shape


# --------------------------------------------------------------------------------------
# Hostile and damaged files: one clear error, before any large allocation
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _peak_allocation():
    """Peak Python + numpy allocation (bytes) inside the block, in box['peak']."""
    box = {}
    tracemalloc.start()
    try:
        yield box
    finally:
        box["peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


_SMALL_PEAK = 32 << 20  # far below the 2 GiB each hostile file below asks for


def _one_tensor_file(path, legacy, declared_numel, size, stride, offset=0, held=1):
    """A file whose only tensor views a float32 storage declaring `declared_numel`
    elements while the file holds `held` of them."""
    data = np.zeros(held, np.float32)
    storage = tw.StorageToPickle("0", data)
    pkl = tw.pickle_tensors({"w": tw.TensorToPickle(storage, offset, size, stride)},
                            legacy, numel_override={"0": declared_numel})
    if legacy:
        tw.write_legacy(path, pkl, {"0": data.tobytes()}, {"0": declared_numel})
    else:
        tw.write_zip(path, pkl, {"0": data.tobytes()})
    return path


@pytest.mark.parametrize("legacy", [False, True])
def test_storage_declared_larger_than_file_is_refused_before_allocating(tmp_path, legacy):
    path = _one_tensor_file(tmp_path / "huge.pth", legacy, 2 ** 29, (2 ** 29,), (1,))
    assert os.path.getsize(path) < 1000
    with _peak_allocation() as mem, pytest.raises(ev.WeightFileError) as info:
        ev.load_torch_state_dict(path)
    assert mem["peak"] < _SMALL_PEAK
    assert str(path) in str(info.value)
    assert "declares 536870912 elements (2147483648 bytes)" in str(info.value)


@pytest.mark.parametrize("legacy", [False, True])
def test_stride_zero_view_cannot_expand_a_tiny_storage(tmp_path, legacy):
    # 2^15 x 2^14 float32 (2 GiB) all reading element 0 of a one-element storage.
    path = _one_tensor_file(tmp_path / "stride0.pth", legacy, 1, (2 ** 15, 2 ** 14), (0, 0))
    with _peak_allocation() as mem, pytest.raises(ev.WeightFileError, match="stride 0"):
        ev.load_torch_state_dict(path)
    assert mem["peak"] < _SMALL_PEAK
    # A small expanded view (within the 1 MiB allowance) is a legitimate tensor.
    path = _one_tensor_file(tmp_path / "small.pth", legacy, 1, (3, 4), (0, 0))
    np.testing.assert_array_equal(ev.load_torch_state_dict(path)["w"], np.zeros((3, 4)))


@pytest.mark.parametrize("offset, size, stride, message", [
    (0, (3,), (1,), "reads past its storage of 2 elements"),
    (2, (1,), (1,), "reads past its storage of 2 elements"),
    (0, (2, 2), (1, 1), "reads past its storage of 2 elements"),
    (1, (2,), (-1,), "bad tensor geometry"),
    (0, (-1,), (1,), "bad tensor geometry"),
    (0, (2, 1), (1,), "bad tensor geometry"),
])
def test_views_outside_their_storage_are_refused(tmp_path, offset, size, stride, message):
    path = _one_tensor_file(tmp_path / "view.pth", False, 2, size, stride, offset, held=2)
    with pytest.raises(ev.WeightFileError, match=message):
        ev.load_torch_state_dict(path)


def _raw_zip(path, members, central_copies=1):
    """A zip built by hand, so members can declare sizes and CRCs that are lies.

    members: (name, method, crc, data, declared_size); `central_copies` > 1 lists each
    member that many times, all pointing at the same data. Layout from the zip
    specification (APPNOTE 4.3.7 local header, 4.3.12 central directory, 4.3.16 end).
    """
    local, central = b"", b""
    for name, method, crc, data, declared in members:
        fields = struct.pack("<HHHHHIIIHH", 20, 0, method, 0, 0x21, crc, len(data),
                             declared, len(name), 0)
        central += central_copies * (
            b"PK\x01\x02" + struct.pack("<H", 20) + fields
            + struct.pack("<HHHII", 0, 0, 0, 0, len(local)) + name.encode())
        local += b"PK\x03\x04" + fields + name.encode() + data
    n = len(members) * central_copies
    end = struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(central), len(local), 0)
    path.write_bytes(local + central + end)
    return path


def _zeros_deflated(n_mib):
    """A raw deflate stream of n_mib MiB of zeros, without compressing them all:
    full-flush blocks do not refer back, so one block can be repeated."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return block * n_mib + c.flush()


def _bomb_members(declared_numel, stream, declared_size):
    pkl = tw.pickle_tensors({"w": tw.TensorToPickle(tw.StorageToPickle(
        "0", np.zeros(1, np.float32)), 0, (declared_numel,), (1,))},
        numel_override={"0": declared_numel})
    return [("a/data.pkl", 0, zlib.crc32(pkl), pkl, len(pkl)),
            ("a/data/0", 8, 0, stream, declared_size)]


def test_zip_bomb_declaring_gigabytes_is_refused(tmp_path):
    # 2 MiB of deflate that honestly inflates to 2 GiB, for a 2 GiB storage.
    stream = _zeros_deflated(2048)
    path = _raw_zip(tmp_path / "bomb.pth", _bomb_members(2 ** 29, stream, 2 ** 31))
    with _peak_allocation() as mem, pytest.raises(ev.WeightFileError, match="zip bomb"):
        ev.load_torch_state_dict(path)
    assert mem["peak"] < _SMALL_PEAK + 2 * len(stream)


def test_zip_member_inflating_past_its_declared_size_is_not_read(tmp_path):
    # The member declares 4 bytes (one float) but its stream inflates to 2 GiB.
    stream = _zeros_deflated(2048)
    path = _raw_zip(tmp_path / "liar.pth", _bomb_members(1, stream, 4))
    with _peak_allocation() as mem, pytest.raises(ev.WeightFileError, match="CRC") as info:
        ev.load_torch_state_dict(path)
    assert mem["peak"] < _SMALL_PEAK + 2 * len(stream)
    assert str(path) in str(info.value)


def test_zip_members_overlapping_or_past_the_end_are_refused(tmp_path):
    pkl = tw.pickle_tensors({})
    members = [("a/data.pkl", 0, zlib.crc32(pkl), pkl, len(pkl))]
    _raw_zip(tmp_path / "ok.pth", members)
    assert ev.load_torch_checkpoint(tmp_path / "ok.pth") == {}
    # Many directory entries sharing one member's bytes (a non-recursive zip bomb).
    _raw_zip(tmp_path / "shared.pth", members, central_copies=40)
    with pytest.raises(ev.WeightFileError, match="overlap or extend past the file"):
        ev.load_torch_checkpoint(tmp_path / "shared.pth")
    data = bytearray((tmp_path / "ok.pth").read_bytes())
    central = data.index(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 20, 10 ** 6)  # compressed size past the end
    (tmp_path / "past.pth").write_bytes(bytes(data))
    with pytest.raises(ev.WeightFileError, match="overlap or extend past the file"):
        ev.load_torch_checkpoint(tmp_path / "past.pth")


@pytest.mark.parametrize("name", ["small_zip.pth", "small_legacy.pth"])
def test_truncated_files_name_the_file(tmp_path, name):
    data = open(os.path.join(FIXTURES, name), "rb").read()
    cuts = sorted(set(np.linspace(0, len(data) - 1, 40).astype(int)) | {1, 2, 8, 60})
    for cut in cuts:
        path = tmp_path / f"cut{cut}.pth"
        path.write_bytes(data[:cut])
        with pytest.raises(ev.WeightFileError) as info:
            ev.load_torch_state_dict(path)
        message = str(info.value)
        assert str(path) in message and "truncated or not a PyTorch checkpoint" in message, (
            cut, message)
        assert "persistent IDs" not in message


def test_rejects_wrong_state_dict():
    sd = {k: np.zeros(s, np.float32) for k, s in _expected_state_dict_shapes().items()}
    sd["Mixed_5b.branch1x1.bn.num_batches_tracked"] = np.array(0, np.int64)  # ignored
    variables = ev.torch_state_dict_to_flax(sd)
    assert variables["params"]["fc"]["kernel"].shape == (2048, 1008)
    bad = dict(sd)
    del bad["Mixed_6e.branch_pool.bn.running_var"]
    with pytest.raises(ValueError, match="Mixed_6e.branch_pool.bn.running_var"):
        ev.torch_state_dict_to_flax(bad)
    bad = dict(sd, **{"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 5, 5), np.float32)})
    with pytest.raises(ValueError, match="Conv2d_1a_3x3.conv.weight"):
        ev.torch_state_dict_to_flax(bad)


def test_layout_conversion_round_trip():
    rng = np.random.default_rng(3)
    sd = {k: rng.normal(size=s).astype(np.float32)
          for k, s in _expected_state_dict_shapes().items()}
    variables = ev.torch_state_dict_to_flax(sd)
    # Torch OIHW [o, i, h, w] is Flax HWIO [h, w, i, o].
    w = sd["Mixed_6b.branch7x7_2.conv.weight"]
    k = variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
    assert w.shape == (128, 128, 1, 7) and k.shape == (1, 7, 128, 128)
    assert k[0, 5, 3, 7] == w[7, 3, 0, 5]
    assert variables["params"]["fc"]["kernel"][10, 3] == sd["fc.weight"][3, 10]
    assert np.array_equal(variables["batch_stats"]["Mixed_7c"]["branch_pool"]["bn"]["var"],
                          sd["Mixed_7c.branch_pool.bn.running_var"])
    back = tw.flax_to_torch_state_dict(variables)
    assert set(back) == set(sd)
    assert all(np.array_equal(back[k], sd[k]) for k in sd)


# --------------------------------------------------------------------------------------
# The whole network against an independent PyTorch forward (one CPU forward, batch 2)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def seeded_files(tmp_path_factory):
    seeded_weight = _load_fixture_module().seeded_weight
    sd = {k: seeded_weight(k, s) for k, s in ev.torch_state_dict_shapes().items()}
    for name, *_ in _architecture_table():  # a real pytorch-fid file has these counters
        sd[f"{name}.bn.num_batches_tracked"] = np.array(0, np.int64)
    directory = tmp_path_factory.mktemp("weights")
    paths = {}
    for legacy in (False, True):
        paths[legacy] = str(directory / f"inception_{'legacy' if legacy else 'zip'}.pth")
        tw.save_torch_state_dict(paths[legacy], sd, legacy=legacy)
    return paths


def test_full_layout_files_load_identically(seeded_files):
    a = ev.load_torch_state_dict(seeded_files[False])
    b = ev.load_torch_state_dict(seeded_files[True])
    assert len(a) == 472 + 94 and list(a) == list(b)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_network_matches_independent_torch_forward(seeded_files):
    ref = np.load(os.path.join(FIXTURES, "inception_reference.npz"))
    inception = ev.get_inception_model(seeded_files[False])
    out = inception(ref["images"])
    pool_3, logits = np.asarray(out["pool_3"]), np.asarray(out["logits"])
    assert pool_3.shape == (2, 2048) and logits.shape == (2, 1008)
    assert pool_3.dtype == np.float32 and np.isfinite(pool_3).all() and np.isfinite(logits).all()
    # float32 in both; observed deviations are ~7e-6 on values of size ~10.
    np.testing.assert_allclose(pool_3[:, ::8], ref["pool_3_every8"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(logits[:, ::8], ref["logits_every8"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pool_3.sum(1), ref["pool_3_sum"], rtol=1e-5)
    np.testing.assert_allclose(logits.sum(1), ref["logits_sum"], rtol=1e-5, atol=1e-3)


# --------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------


def test_compute_activations_pads_ragged_batches_and_keeps_order():
    seen = []

    def fake_inception(images):
        seen.append(images.shape[0])
        first = images[:, 0, 0, 0].astype(np.float32)
        return {"pool_3": np.repeat(first[:, None], 2048, 1),
                "logits": np.repeat(-first[:, None], 1008, 1)}

    values = np.arange(7, dtype=np.uint8)
    batches = [np.broadcast_to(values[i:i + 3, None, None, None], (len(values[i:i + 3]), 4, 4, 3))
               for i in range(0, 7, 3)]
    out = ev.compute_activations(fake_inception, batches)
    assert seen == [3, 3, 3]
    np.testing.assert_array_equal(out["pool_3"][:, 5], values)
    np.testing.assert_array_equal(out["logits"][:, 0], -values.astype(np.float32))
    assert out["pool_3"].shape == (7, 2048) and out["logits"].shape == (7, 1008)


def test_rejects_float_images():
    inception_fn = ev.get_inception_model_from_variables({})
    with pytest.raises(ValueError, match="uint8"):
        inception_fn(np.zeros((2, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"\[B, H, W, 1\]"):
        inception_fn(np.zeros((2, 8, 8, 2), np.uint8))


def test_chunks_keep_order_and_compile_few_shapes():
    traced = []

    @jax.jit
    def forward(v, x):
        traced.append(x.shape[0])  # runs once per compiled shape
        return {"pool_3": x.astype(jnp.float32).mean((1, 2, 3)) * v["s"],
                "logits": x[:, 0, 0, :].astype(jnp.float32)}

    inception_fn = ev.inception.chunked(forward, {"s": np.float32(2.0)}, chunk_size=4)
    rng = np.random.default_rng(0)
    # Batches of 7 = 4 + 3 (padded to 4), 5 = 4 + 1, 6 = 4 + 2, 11 = 4 + 4 + 3, 1.
    for _ in range(2):  # the second round compiles nothing new
        for b in (7, 5, 6, 11, 1):
            x = rng.integers(0, 256, (b, 3, 2, 3), dtype=np.uint8)
            out = inception_fn(x)
            assert out["pool_3"].shape == (b,) and out["logits"].shape == (b, 3)
            np.testing.assert_allclose(np.asarray(out["pool_3"]), 2 * x.mean((1, 2, 3)),
                                       rtol=1e-6)
            np.testing.assert_array_equal(np.asarray(out["logits"]), x[:, 0, 0, :])
    assert sorted(traced) == [1, 2, 4]


def test_grey_images_are_repeated_to_rgb():
    grey = np.random.default_rng(9).integers(0, 256, (2, 12, 10, 1), dtype=np.uint8)
    got = np.asarray(ev.preprocess_images(jnp.asarray(grey)))
    want = np.asarray(ev.preprocess_images(jnp.asarray(np.repeat(grey, 3, axis=-1))))
    assert got.shape == (2, 299, 299, 3)
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------------------
# Weights download and errors
# --------------------------------------------------------------------------------------


class _FakeResponse(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_offline_error_names_url_cache_and_config_key(tmp_path, monkeypatch):
    monkeypatch.setenv("SCORE_SDE_CACHE", str(tmp_path))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(ev.weights.urllib.request, "urlopen", offline)
    with pytest.raises(FileNotFoundError) as info:
        ev.get_inception_model()
    message = str(info.value)
    assert ev.FID_WEIGHTS_URL in message
    assert str(tmp_path / ev.FID_WEIGHTS_FILENAME) in message
    assert "eval.inception_weights" in message
    assert os.listdir(tmp_path) == []


def test_download_checks_hash_and_renames_atomically(tmp_path, monkeypatch):
    import hashlib
    payload = b"not the inception weights"
    monkeypatch.setattr(ev.weights.urllib.request, "urlopen",
                        lambda *a, **k: _FakeResponse(payload))
    with pytest.raises(RuntimeError, match="SHA-256"):
        ev.download_inception_weights(str(tmp_path))
    assert os.listdir(tmp_path) == []

    monkeypatch.setattr(ev.weights, "FID_WEIGHTS_SHA256_PREFIX",
                        hashlib.sha256(payload).hexdigest()[:8])
    path = ev.download_inception_weights(str(tmp_path))
    assert path == str(tmp_path / ev.FID_WEIGHTS_FILENAME)
    assert open(path, "rb").read() == payload and os.listdir(tmp_path) == [ev.FID_WEIGHTS_FILENAME]

    def fail(*args, **kwargs):
        raise AssertionError("downloaded again")

    monkeypatch.setattr(ev.weights.urllib.request, "urlopen", fail)
    assert ev.download_inception_weights(str(tmp_path)) == path


def test_default_path_reads_the_cache(seeded_files, tmp_path, monkeypatch):
    monkeypatch.setenv("SCORE_SDE_CACHE", str(tmp_path))
    os.symlink(seeded_files[True], tmp_path / ev.FID_WEIGHTS_FILENAME)

    def fail(*args, **kwargs):
        raise AssertionError("should not download when the cache has the file")

    monkeypatch.setattr(ev.weights.urllib.request, "urlopen", fail)
    variables = ev.load_inception_variables(None)
    want = _load_fixture_module().seeded_weight("fc.bias", (1008,))
    np.testing.assert_array_equal(variables["params"]["fc"]["bias"], want)


def test_missing_explicit_weights_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.inception_weights"):
        ev.get_inception_model(str(tmp_path / "nope.pth"))


# --------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------


def _rotation(theta):
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


def _block_gaussians():
    """Two 4-d Gaussians with block-diagonal, non-commuting covariances."""
    blocks1 = [np.diag([2.0, 0.5]), np.array([[1.0, 0.3], [0.3, 0.8]])]
    blocks2 = [_rotation(0.7) @ np.diag([1.5, 0.2]) @ _rotation(0.7).T, np.diag([0.4, 3.0])]
    s1, s2 = scipy.linalg.block_diag(*blocks1), scipy.linalg.block_diag(*blocks2)
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 0.5]), np.array([0.5, 0.0, -1.0, 2.0])
    # Tr sqrt(M) for a 2x2 M with positive eigenvalues is sqrt(tr M + 2 sqrt(det M)).
    tr_sqrt = sum(np.sqrt(np.trace(a @ b) + 2 * np.sqrt(np.linalg.det(a @ b)))
                  for a, b in zip(blocks1, blocks2, strict=True))
    exact = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    return mu1, s1, mu2, s2, exact


def test_fid_from_stats_closed_form():
    mu1, s1, mu2, s2, exact = _block_gaussians()
    assert ev.fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-12)
    # Diagonal covariances: sum (sqrt a - sqrt b)^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.0])
    fid = ev.fid_from_stats(np.zeros(3), np.diag(a), np.ones(3), np.diag(b))
    assert fid == pytest.approx(3 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-12)


def test_fid_matches_scipy_sqrtm_formula():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(300, 32)), rng.normal(size=(300, 32)) @ rng.normal(size=(32, 32))
    mu1, s1, mu2, s2 = *ev.activation_stats(x), *ev.activation_stats(y)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert ev.fid_from_activations(x, y) == pytest.approx(want, rel=1e-8)


def test_fid_of_samples_converges_to_analytic():
    mu1, s1, mu2, s2, exact = _block_gaussians()
    errors = []
    for n in (1_000, 200_000):
        rng = np.random.default_rng(n)
        a = rng.multivariate_normal(mu1, s1, size=n)
        b = rng.multivariate_normal(mu2, s2, size=n)
        errors.append(abs(ev.fid_from_activations(a, b) - exact))
    assert errors[1] < errors[0]
    assert errors[1] < 0.01 * exact


def test_fid_of_identical_sets_is_zero():
    rng = np.random.default_rng(5)
    for n, d in ((1000, 64), (50, 256)):  # full rank, and rank-deficient N < D
        a = rng.normal(size=(n, d)) * rng.uniform(0.1, 3, d)
        assert abs(ev.fid_from_activations(a, a)) < 1e-6


# --------------------------------------------------------------------------------------
# KID
# --------------------------------------------------------------------------------------


def _mmd2_unbiased_loops(x, y):
    d = x.shape[1]

    def k(u, v):
        return (u @ v / d + 1) ** 3

    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return kxx + kyy - 2 * kxy


def test_kid_single_block_is_unbiased_mmd():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(7, 3)) + 0.3
    assert ev.kid_from_activations(x, y) == pytest.approx(_mmd2_unbiased_loops(x, y), rel=1e-10)


def test_kid_block_split_follows_tfgan():
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(10, 3)), rng.normal(size=(7, 3))
    # n_blocks = ceil(10 / 4) = 3; x blocks 3, 3, 4; y blocks 2, 2, 3 (larger ones last).
    blocks = [(x[0:3], y[0:2]), (x[3:6], y[2:4]), (x[6:10], y[4:7])]
    ests = [_mmd2_unbiased_loops(a, b) for a, b in blocks]
    mean, std = ev.kid_and_std_from_activations(x, y, max_block_size=4)
    assert mean == pytest.approx(np.mean(ests), rel=1e-10)
    assert std == pytest.approx(np.std(ests, ddof=1) / np.sqrt(3), rel=1e-10)


def test_kid_of_equal_distributions_is_zero_with_right_spread():
    estimates, stderrs = [], []
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        mean, std = ev.kid_and_std_from_activations(
            rng.normal(size=(600, 8)), rng.normal(size=(600, 8)), max_block_size=100)
        estimates.append(mean)
        stderrs.append(std)
    estimates = np.array(estimates)
    sem = estimates.std(ddof=1) / np.sqrt(len(estimates))
    assert abs(estimates.mean()) < 3 * sem
    # The reported standard error matches the observed seed-to-seed spread.
    assert 0.5 < np.mean(stderrs) / estimates.std(ddof=1) < 2.0


def _cubic_kernel_expectation(a, b, d):
    """E (x.y / d + 1)^3 for independent x ~ N(a, I), y ~ N(b, I) in d dims.

    With S = x.y = c + T, c = a.b: E T = 0, E T^2 = |a|^2 + |b|^2 + d, E T^3 = 6 c.
    """
    c = a @ b
    t2 = a @ a + b @ b + d
    s1, s2, s3 = c, c ** 2 + t2, c ** 3 + 3 * c * t2 + 6 * c
    return s3 / d ** 3 + 3 * s2 / d ** 2 + 3 * s1 / d + 1


def test_kid_of_shifted_gaussians_matches_closed_form():
    d = 4
    m1, m2 = np.zeros(d), np.array([1.0, 0.5, 0.0, -0.5])
    exact = (_cubic_kernel_expectation(m1, m1, d) + _cubic_kernel_expectation(m2, m2, d)
             - 2 * _cubic_kernel_expectation(m1, m2, d))
    estimates = []
    for seed in range(10):
        rng = np.random.default_rng(200 + seed)
        estimates.append(ev.kid_from_activations(
            rng.normal(size=(2000, d)) + m1, rng.normal(size=(2000, d)) + m2))
    sem = np.std(estimates, ddof=1) / np.sqrt(len(estimates))
    assert exact > 0.1
    assert abs(np.mean(estimates) - exact) < 4 * sem


# --------------------------------------------------------------------------------------
# Inception score
# --------------------------------------------------------------------------------------


def test_inception_score_closed_forms():
    assert ev.inception_score_from_logits(np.zeros((10, 1008))) == pytest.approx(1.0, abs=1e-12)
    k = 10
    labels = np.arange(50) % k
    confident = np.full((50, 1008), -1e4)
    confident[np.arange(50), labels] = 1e4
    assert ev.inception_score_from_logits(confident) == pytest.approx(k, rel=1e-9)
    # Confident predictions with class frequencies f: IS = exp(entropy(f)).
    labels = np.array([0] * 6 + [1] * 3 + [2])
    confident = np.full((10, 1008), -1e4)
    confident[np.arange(10), labels] = 1e4
    f = np.array([0.6, 0.3, 0.1])
    assert ev.inception_score_from_logits(confident) == pytest.approx(
        np.exp(-(f * np.log(f)).sum()), rel=1e-9)


# --------------------------------------------------------------------------------------
# Stats files
# --------------------------------------------------------------------------------------


def _config(stats_dir="", dataset="CIFAR10", image_size=32, category=""):
    config = ml_collections.ConfigDict()
    config.data = ml_collections.ConfigDict(
        {"dataset": dataset, "image_size": image_size, "category": category})
    config.eval = ml_collections.ConfigDict({"stats_dir": stats_dir})
    return config


def test_stats_round_trip_and_default_path(tmp_path):
    default = ev.dataset_stats_path(_config())
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert default == os.path.join(root, "assets", "stats", "cifar10_stats.npz")
    assert ev.dataset_stats_path(_config(dataset="LSUN", image_size=256,
                                         category="church_outdoor")).endswith(
        "lsun_church_outdoor_256_stats.npz")
    assert ev.dataset_stats_path(_config(dataset="FashionMNIST", image_size=32)).endswith(
        "fashionmnist_32_stats.npz")
    pool_3 = np.random.default_rng(8).normal(size=(5, 2048)).astype(np.float32)
    logits = np.ones((5, 1008), np.float32)
    folder = tmp_path / "sub"
    ev.save_stats(str(folder / "cifar10_stats.npz"), pool_3, logits)
    stats = ev.load_dataset_stats(_config(str(folder)))
    np.testing.assert_array_equal(stats["pool_3"], pool_3)
    np.testing.assert_array_equal(stats["logits"], logits)
    assert os.listdir(folder) == ["cifar10_stats.npz"]


def test_missing_stats_tells_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="--mode=fid_stats"):
        ev.load_dataset_stats(_config(str(tmp_path)))
