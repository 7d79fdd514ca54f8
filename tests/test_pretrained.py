"""pretrained: checkpoints written by the reference implementations' own code (score_sde's flax
msgpack, score_sde_pytorch's .pth, a diffusers pipeline; tests/fixtures/interop/README.md)
reproduce the outputs those implementations computed; export to diffusers round-trips; hostile
and mismatched inputs give one clear error. Needs neither torch nor diffusers
(test_pretrained_diffusers.py runs the exported folder in diffusers itself)."""

import json
import os
import re
import shutil
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch_pickle_writer as tw
from flax import serialization, traverse_util
from run_helpers import ROOT, restore_tree, run

import configs
import pretrained
import sde_lib
from configs.ve.ncsnv2 import cifar10 as ncsnv2_cifar10
from configs.vp import fashion_mnist_ddpmpp_quickstart
from models import utils as mutils
from run_lib import interop

HERE = os.path.dirname(os.path.abspath(__file__))
INTEROP = os.path.join(HERE, "fixtures", "interop")
# The score_sde_pytorch checkpoint of config (a) is shared with the evaluation tests.
VE_PTH = os.path.join(HERE, "fixtures", "score_sde_pytorch_ve_checkpoint_1.pth")
TOL = 1e-4  # relative to the largest reference value; the references agree to ~7e-6

CASES = [
    ("a_ve_ncsnpp_continuous", "score_sde", "checkpoint_1", "score_sde"),
    ("a_ve_ncsnpp_continuous", "score_sde_pytorch", VE_PTH, "score_sde_pytorch"),
    ("b_vp_ddpmpp_continuous", "score_sde", "checkpoint_1", "score_sde"),
    ("b_vp_ddpmpp_continuous", "score_sde_pytorch", "checkpoint_1.pth", "score_sde_pytorch"),
    ("c_vp_ddpm", "score_sde", "checkpoint_1", "score_sde"),
    ("c_vp_ddpm", "score_sde_pytorch", "checkpoint_1.pth", "score_sde_pytorch"),
    ("a2_ve_ncsnpp_skip_continuous", "diffusers", "", "diffusers_pipeline"),
]
A2 = os.path.join(INTEROP, "a2_ve_ncsnpp_skip_continuous", "diffusers")


def fixture_config(folder):
    with open(os.path.join(folder, "config.json")) as f:
        return configs.complete(ml_collections.ConfigDict(json.load(f)["config"]))


def relative_error(out, ref):
    return float(np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref)))


def assert_trees_equal(a, b):
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert sorted(flat_a) == sorted(flat_b)
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]),
                                      err_msg=str(key))


@pytest.mark.parametrize("name,framework,file,fmt", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_reference_outputs(name, framework, file, fmt):
    folder = os.path.join(INTEROP, name, framework)
    config = fixture_config(folder)
    io = np.load(os.path.join(folder, "io.npz"))
    path = os.path.join(folder, file)
    assert pretrained.detect_format(path) == fmt
    loaded = pretrained.load(path, config)
    assert loaded.format == fmt
    # diffusers folders store no training step.
    assert loaded.step == (0 if framework == "diffusers" else 2)
    model = mutils.create_model(config)
    for params, key in ((loaded.params, "out_raw"), (loaded.params_ema, "out_ema")):
        out = model.apply({"params": params}, io["x"], io["labels"], train=False)
        assert relative_error(out, io[key]) <= TOL, key
    score_fn = mutils.get_score_fn(sde_lib.get_sde(config), model, loaded.params_ema,
                                   loaded.model_state, train=False,
                                   continuous=config.training.continuous)
    assert relative_error(score_fn(io["x"], io["t"]), io["score_ema"]) <= TOL
    # Raw and EMA parameters really differ (the fixture adds noise to the EMA).
    assert relative_error(model.apply({"params": loaded.params}, io["x"], io["labels"],
                                      train=False), io["out_ema"]) > 10 * TOL


def test_score_sde_adam_moments_and_reference_names():
    path = os.path.join(INTEROP, "a_ve_ncsnpp_continuous", "score_sde", "checkpoint_1")
    with open(path, "rb") as f:
        raw = serialization.msgpack_restore(f.read())
    loaded = pretrained.load(path, fixture_config(os.path.dirname(path)))
    mu, nu, count = loaded.adam
    assert count == 2
    moments = raw["optimizer"]["state"]["param_states"]
    # The reference's FIR conv names its kernel `weight`.
    ref = moments["Downsample_0"]["Conv2d_0"]["weight"]
    np.testing.assert_array_equal(mu["Downsample_0"]["Conv2d_0"]["kernel"], ref["grad_ema"])
    np.testing.assert_array_equal(nu["Downsample_0"]["Conv2d_0"]["kernel"], ref["grad_sq_ema"])
    np.testing.assert_array_equal(loaded.params["Downsample_0"]["Conv2d_0"]["kernel"],
                                  raw["optimizer"]["target"]["Downsample_0"]["Conv2d_0"]["weight"])


def test_pth_layouts_ema_and_adam():
    from evaluation.pth import load_torch_checkpoint

    config = fixture_config(os.path.join(INTEROP, "a_ve_ncsnpp_continuous", "score_sde_pytorch"))
    raw = load_torch_checkpoint(VE_PTH)
    loaded = pretrained.load(VE_PTH, config)
    model = raw["model"]
    # all_modules.4 is the first residual block; conv [out, in, kh, kw] -> [kh, kw, in, out].
    np.testing.assert_array_equal(
        loaded.params["ResnetBlockBigGANpp_0"]["Conv_0"]["kernel"],
        model["module.all_modules.4.Conv_0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(loaded.params["Dense_0"]["kernel"],
                                  model["module.all_modules.1.weight"].T)
    # The fixed Fourier features are not in the EMA list: their EMA is the model's W.
    names = [k for k in model if k != "module.sigmas"]
    assert len(raw["ema"]["shadow_params"]) == len(names) - 1
    w = model["module.all_modules.0.W"]
    np.testing.assert_array_equal(loaded.params_ema["GaussianFourierProjection_0"]["W"], w)
    np.testing.assert_array_equal(loaded.params_ema["Dense_0"]["kernel"],
                                  raw["ema"]["shadow_params"][0].T)
    mu, nu, count = loaded.adam
    assert count == 2
    np.testing.assert_array_equal(mu["Dense_0"]["kernel"],
                                  raw["optimizer"]["state"][1]["exp_avg"].T)
    assert float(jnp.max(jnp.abs(mu["GaussianFourierProjection_0"]["W"]))) == 0.0


def test_import_state_carries_adam_moments():
    folder = os.path.join(INTEROP, "b_vp_ddpmpp_continuous", "score_sde")
    config = fixture_config(folder)
    loaded = pretrained.load(os.path.join(folder, "checkpoint_1"), config)
    state = interop._state(config, loaded)
    adam = [s for s in jax.tree_util.tree_leaves(
        state.opt_state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")]
    assert len(adam) == 1 and int(adam[0].count) == 2
    assert_trees_equal(adam[0].mu, loaded.adam[0])
    assert_trees_equal(adam[0].nu, loaded.adam[1])
    assert int(state.step) == 2
    assert_trees_equal(state.params_ema, loaded.params_ema)


def test_imported_state_of_other_shapes_is_refused_naming_the_array():
    state = mutils.State(step=np.int32(0), params={"Conv_0": {"kernel": np.zeros((3, 3, 1, 4))}},
                         opt_state=(), params_ema={}, model_state={}, rng=np.zeros(2, np.uint32))
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    interop._check_layout(state, abstract)  # the same layout: no error
    other = abstract.replace(params={"Conv_0": {"kernel": jax.ShapeDtypeStruct((3, 3, 1, 8),
                                                                               np.float32)}})
    with pytest.raises(interop.UsageError, match=re.escape(
            "the imported state does not match this config's train state: parameter "
            "'params.Conv_0.kernel' has shape (3, 3, 1, 4) in the checkpoint but (3, 3, 1, 8) in "
            "this config's train state.")):
        interop._check_layout(state, other)
    with pytest.raises(interop.UsageError, match="layout differs"):
        interop._check_layout(state, abstract.replace(opt_state=[]))


# ---------------------------------------------------------------------------- diffusers

def test_export_then_load_gives_identical_parameters(tmp_path):
    config = fixture_config(A2)
    loaded = pretrained.load(A2, config)
    out = pretrained.export_diffusers(config, loaded.params_ema, str(tmp_path / "export"))
    assert pretrained.detect_format(out) == "diffusers_pipeline"
    again = pretrained.load(out, config)
    assert_trees_equal(again.params, loaded.params_ema)
    assert_trees_equal(again.params_ema, loaded.params_ema)  # no unet_ema/: same weights
    unet = pretrained.load(os.path.join(out, "unet"), config)
    assert unet.format == "diffusers_unet"
    assert_trees_equal(unet.params, loaded.params_ema)
    # The same names, layouts and configs diffusers itself wrote.
    from safetensors.numpy import load_file

    ours = load_file(os.path.join(out, "unet", pretrained.UNET_WEIGHTS))
    theirs = load_file(os.path.join(A2, "unet_ema", pretrained.UNET_WEIGHTS))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    for rel in ("unet/config.json", "scheduler/scheduler_config.json", "model_index.json"):
        with open(os.path.join(out, rel)) as f, open(os.path.join(A2, rel)) as g:
            assert json.load(f) == json.load(g), rel


def test_export_refuses_what_diffusers_cannot_express(tmp_path):
    folder = os.path.join(INTEROP, "b_vp_ddpmpp_continuous", "score_sde")
    config = fixture_config(folder)
    loaded = pretrained.load(os.path.join(folder, "checkpoint_1"), config)
    with pytest.raises(pretrained.PretrainedError,
                       match=r"cannot express.*embedding_type='positional'.*progressive='none'"):
        pretrained.export_diffusers(config, loaded.params, str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()


def test_export_refuses_a_non_empty_folder(tmp_path):
    config = fixture_config(A2)
    (tmp_path / "keep.txt").write_text("results")
    with pytest.raises(pretrained.PretrainedError, match="not empty"):
        pretrained.export_diffusers(config, pretrained.load(A2, config).params, str(tmp_path))
    assert (tmp_path / "keep.txt").read_text() == "results"


def test_diffusers_scheduler_must_match_the_sde(tmp_path):
    config = fixture_config(A2)
    config.unlock()
    config.model.sigma_max = 348
    with pytest.raises(pretrained.PretrainedError, match=r"sigma_max=50 but config.model"):
        pretrained.load(A2, config)


# ---------------------------------------------------------------------------- other networks

def _reference_state(params, step=7):
    """The reference's flax 0.3 train State, as its checkpoints.save_checkpoint writes it."""
    moments = jax.tree_util.tree_map(
        lambda p: {"grad_ema": np.zeros_like(p), "grad_sq_ema": np.zeros_like(p)}, params)
    return {"step": np.int32(step),
            "optimizer": {"target": params,
                          "state": {"step": np.int32(step), "param_states": moments}},
            "lr": np.float32(2e-4), "model_state": {}, "ema_rate": np.float32(0.999),
            "params_ema": jax.tree_util.tree_map(lambda p: p + 1, params),
            "rng": np.zeros(2, np.uint32)}


def _numpy_params(config, seed=0):
    """Random parameters shaped as the config's network (no initialization compiled)."""
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map(
        lambda s: rng.standard_normal(s.shape).astype(np.float32), mutils.param_shapes(config))


def test_score_sde_ncsnv2_state(tmp_path):
    config = ncsnv2_cifar10.get_config()
    config.model.nf = 8
    config.data.image_size = 16
    params = _numpy_params(config)
    path = tmp_path / "checkpoint_3"
    path.write_bytes(serialization.msgpack_serialize(_reference_state(params)))
    loaded = pretrained.load(str(path), config)
    assert loaded.step == 7
    assert_trees_equal(loaded.params, params)
    assert_trees_equal(loaded.params_ema, jax.tree_util.tree_map(lambda p: p + 1, params))


def test_classifier_params_without_the_registry_prefix(tmp_path):
    config = configs.complete(ml_collections.ConfigDict({
        "model": {"name": "wideresnet_noise_conditional", "blocks_per_group": 1,
                  "channel_multiplier": 1, "num_classes": 10},
        "data": {"image_size": 32, "num_channels": 3}}))
    params = _numpy_params(config)
    assert list(params) == ["WideResnet"]
    # The reference instantiates WideResnet directly and saves its params alone.
    path = tmp_path / "checkpoint_classifier"
    path.write_bytes(serialization.msgpack_serialize(params["WideResnet"]))
    loaded = pretrained.load(str(path), config)
    assert loaded.step == 0
    assert_trees_equal(loaded.params, params)
    assert_trees_equal(loaded.params_ema, params)


# ---------------------------------------------------------------------------- bad input

def test_truncated_msgpack(tmp_path):
    src = os.path.join(INTEROP, "a_ve_ncsnpp_continuous", "score_sde")
    data = open(os.path.join(src, "checkpoint_1"), "rb").read()
    path = tmp_path / "checkpoint_1"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(pretrained.PretrainedError, match=r"checkpoint_1: .*truncated"):
        pretrained.load(str(path), fixture_config(src))


def test_garbage_safetensors_header(tmp_path):
    folder = tmp_path / "pipeline"
    shutil.copytree(A2, folder)
    weights = folder / "unet" / pretrained.UNET_WEIGHTS
    weights.write_bytes((2 ** 40).to_bytes(8, "little") + b"{not json" * 10)
    with pytest.raises(pretrained.PretrainedError,
                       match=r"diffusion_pytorch_model.safetensors: not a readable safetensors"):
        pretrained.load(str(folder), fixture_config(A2))


def test_code_executing_pickle_does_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint_1.pth"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl",
                    b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR.")
    config = fixture_config(os.path.join(INTEROP, "a_ve_ncsnpp_continuous", "score_sde"))
    with pytest.raises(pretrained.PretrainedError, match=r"os.system"):
        pretrained.load(str(path), config)
    assert not marker.exists()


def test_unknown_content(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x00garbage" * 4)
    with pytest.raises(pretrained.PretrainedError, match="not a checkpoint this project reads"):
        pretrained.detect_format(str(path))
    with pytest.raises(pretrained.PretrainedError, match="model_index.json"):
        pretrained.detect_format(str(tmp_path))


def test_pth_of_another_architecture(tmp_path):
    path = tmp_path / "ncsnv2.pth"
    tw.save_torch_state_dict(path, {"module.begin_conv.weight": np.zeros((4, 3, 3, 3),
                                                                         np.float32)})
    config = fixture_config(os.path.join(INTEROP, "a_ve_ncsnpp_continuous", "score_sde"))
    with pytest.raises(pretrained.PretrainedError, match=r"begin_conv.weight.*all_modules"):
        pretrained.load(str(path), config)


@pytest.mark.parametrize("name,framework,file,expected", [
    # Modules on one side only come first (here the residual input pyramid of NCSN++).
    ("a_ve_ncsnpp_continuous", "score_sde", "checkpoint_1",
     "parameter 'Downsample_0/Conv2d_0/bias' (shape (4,) in the checkpoint) is absent from the "
     "config"),
    # .pth modules pair up by position: the first pair that differs is named.
    ("b_vp_ddpmpp_continuous", "score_sde_pytorch", "checkpoint_1.pth",
     "the checkpoint has 23 modules with parameters, the config's network 26; all_modules.0 in "
     "the checkpoint (bias (16,), weight (16, 4)) differs from GaussianFourierProjection_0 in "
     "the config (W (4,))"),
])
def test_mismatched_config_names_the_parameter(name, framework, file, expected):
    # An NCSN++ (VE) checkpoint with the DDPM++ (VP) config and the other way round.
    other = "b_vp_ddpmpp_continuous" if name.startswith("a_") else "a_ve_ncsnpp_continuous"
    config = fixture_config(os.path.join(INTEROP, other, "score_sde"))
    with pytest.raises(pretrained.PretrainedError) as info:
        pretrained.load(os.path.join(INTEROP, name, framework, file), config)
    message = str(info.value)
    assert "\n" not in message
    assert "does not match config.model (ncsnpp): " + expected in message
    assert "No config file in configs/ builds this network" in message


def test_mismatch_suggests_the_config_file(tmp_path):
    good = fashion_mnist_ddpmpp_quickstart.get_config()
    path = tmp_path / "checkpoint_2"
    path.write_bytes(serialization.msgpack_serialize(_reference_state(_numpy_params(good))))
    wrong = fashion_mnist_ddpmpp_quickstart.get_config()
    wrong.model.num_res_blocks += 1  # a deeper network than the checkpoint's
    with pytest.raises(pretrained.PretrainedError) as info:
        pretrained.load(str(path), wrong)
    message = str(info.value)
    assert re.search(r"parameter '\w+_\d+/\S+' is absent from the checkpoint "
                     r"\(shape \([\d, ]+\) in the config\)", message), message
    assert "configs/vp/fashion_mnist_ddpmpp_quickstart.py" in message


# ---------------------------------------------------------------------------- main.py modes

def _tfrecords(path, n=8, size=16):
    """A tiny 16x16 RGB data set in the FFHQ TFRecord format (raw uint8 CHW `data`, `shape`)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for image in rng.integers(0, 256, size=(n, 3, size, size)).astype(np.uint8):
            feature = {
                "shape": tf.train.Feature(int64_list=tf.train.Int64List(value=image.shape)),
                "data": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()]))}
            example = tf.train.Example(features=tf.train.Features(feature=feature))
            writer.write(example.SerializeToString())
    return str(path)


def _main(mode, workdir, fixture, *overrides):
    return [sys.executable, os.path.join(ROOT, "main.py"), f"--mode={mode}",
            f"--config={os.path.join(INTEROP, 'config.py')}:{fixture}", f"--workdir={workdir}",
            *overrides]


def test_import_then_eval_bits_per_dim(tmp_path):
    fixture = "a_ve_ncsnpp_continuous/score_sde"
    source = os.path.join(INTEROP, fixture, "checkpoint_1")
    workdir = str(tmp_path / "work")
    run(_main("import", workdir, fixture, f"--config.pretrained.path={source}"))
    stored = restore_tree(os.path.join(workdir, "checkpoints", "checkpoint_1"))
    loaded = pretrained.load(source, fixture_config(os.path.dirname(source)))
    assert int(stored["step"]) == 2
    assert_trees_equal(stored["params_ema"], loaded.params_ema)
    assert_trees_equal(stored["params"], loaded.params)
    # Importing again would overwrite it: refused.
    config = fixture_config(os.path.dirname(source))
    config.pretrained.path = source
    with pytest.raises(interop.UsageError, match="checkpoint_1 exists"):
        interop.import_checkpoint(config, workdir)

    data = _tfrecords(tmp_path / "tiny.tfrecords")
    run(_main("eval", workdir, fixture, "--config.eval.enable_bpd=True",
              "--config.eval.enable_loss=False", "--config.eval.begin_ckpt=1",
              "--config.eval.end_ckpt=1", "--config.eval.batch_size=4",
              "--config.eval.num_bpd_batches=1", "--config.eval.bpd_num_repeats=1",
              "--config.data.dataset=FFHQ", f"--config.data.tfrecords_path={data}"))
    with open(os.path.join(workdir, "eval", "summary.json")) as f:
        summary = json.load(f)["1"]
    assert summary["step"] == 2
    # Uniform noise in [0, 1) images: a meaningful bits/dim is positive and finite.
    assert np.isfinite(summary["bpd"]) and summary["bpd"] > 0


def test_import_diffusers_then_export(tmp_path):
    fixture = "a2_ve_ncsnpp_skip_continuous/diffusers"
    workdir, out = str(tmp_path / "work"), str(tmp_path / "exported")
    run(_main("import", workdir, fixture, f"--config.pretrained.path={A2}"))
    run(_main("export", workdir, fixture, f"--config.pretrained.out={out}"))
    from safetensors.numpy import load_file

    ours = load_file(os.path.join(out, "unet", pretrained.UNET_WEIGHTS))
    theirs = load_file(os.path.join(A2, "unet_ema", pretrained.UNET_WEIGHTS))
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)
    # A hostile file through main.py: one line, exit code 2, and its code never ran.
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("archive/data.pkl",
                    b"cos\nsystem\n(V" + f"touch {marker}".encode() + b"\ntR.")
    bad = run(_main("import", str(tmp_path / "w2"), fixture, f"--config.pretrained.path={evil}"),
              ok=False)
    assert bad.returncode == 2 and not marker.exists()
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "os.system" in bad.stderr.strip().splitlines()[-1]
