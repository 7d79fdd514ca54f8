"""Export to score_sde_pytorch (pretrained.export_score_sde_pytorch, --mode=export
--config.pretrained.format=score_sde_pytorch): the reference's own checkpoints
(tests/fixtures/interop, written by yang-song/score_sde_pytorch) come back byte for byte after
import then export; exports round-trip through the importer; real torch loads them."""

import os

import numpy as np
import pytest
from run_helpers import restore_tree
from test_pretrained import VE_PTH, assert_trees_equal, fixture_config

import pretrained
from configs import tiny_test
from configs.ve.ncsnv2 import cifar10 as ncsnv2_cifar10
from evaluation.pth import load_torch_checkpoint
from run_lib import interop

INTEROP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "interop")
REFERENCE = {
    "a_ve_ncsnpp_continuous": VE_PTH,
    "b_vp_ddpmpp_continuous": os.path.join(INTEROP, "b_vp_ddpmpp_continuous",
                                           "score_sde_pytorch", "checkpoint_1.pth"),
    "c_vp_ddpm": os.path.join(INTEROP, "c_vp_ddpm", "score_sde_pytorch", "checkpoint_1.pth"),
}


def _config(name):
    return fixture_config(os.path.join(INTEROP, name, "score_sde_pytorch"))


def _export_reference(name, tmp_path):
    config = _config(name)
    loaded = pretrained.load(REFERENCE[name], config)
    out = pretrained.export_score_sde_pytorch(config, loaded.params, str(tmp_path / "ck.pth"),
                                              loaded.params_ema, loaded.adam, loaded.step)
    return config, loaded, out


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_checkpoint_comes_back_identical(name, tmp_path):
    config, _, out = _export_reference(name, tmp_path)
    ref, got = load_torch_checkpoint(REFERENCE[name]), load_torch_checkpoint(out)
    assert list(got) == list(ref)  # optimizer, model, ema, step
    assert list(got["model"]) == list(ref["model"])  # keys in model.parameters() order
    for key, value in ref["model"].items():
        assert got["model"][key].dtype == value.dtype, key
        if key == "module.sigmas":
            continue
        np.testing.assert_array_equal(got["model"][key], value, err_msg=key)
    # The noise-level buffer is score_sde_pytorch's get_sigmas, np.exp of a float64 linspace,
    # and numpy's float64 exp differs by one ulp between its AVX-512 and AVX2 code paths (the
    # fixtures were written on an AVX-512 machine). So the buffer must be the reference's
    # computation on this machine exactly, and the fixture's to within that ulp.
    m = config.model
    sigmas = got["model"]["module.sigmas"]
    np.testing.assert_array_equal(
        sigmas, np.exp(np.linspace(np.log(m.sigma_max), np.log(m.sigma_min), m.num_scales)))
    np.testing.assert_array_max_ulp(sigmas, ref["model"]["module.sigmas"], maxulp=1)
    assert len(got["ema"]["shadow_params"]) == len(ref["ema"]["shadow_params"])
    for a, b in zip(got["ema"]["shadow_params"], ref["ema"]["shadow_params"], strict=True):
        np.testing.assert_array_equal(a, b)
    assert (got["ema"]["decay"], got["ema"]["num_updates"], got["step"]) == (
        ref["ema"]["decay"], ref["ema"]["num_updates"], ref["step"])
    state, ref_state = got["optimizer"]["state"], ref["optimizer"]["state"]
    assert sorted(state) == sorted(ref_state)
    for i in ref_state:
        for field in ("step", "exp_avg", "exp_avg_sq"):
            np.testing.assert_array_equal(state[i][field], ref_state[i][field])
    group, ref_group = got["optimizer"]["param_groups"][0], ref["optimizer"]["param_groups"][0]
    for field in ("betas", "eps", "weight_decay", "params"):
        assert group[field] == ref_group[field], field


def test_export_then_import_gives_identical_parameters(tmp_path):
    config, loaded, out = _export_reference("b_vp_ddpmpp_continuous", tmp_path)
    again = pretrained.load(out, config)
    assert again.format == "score_sde_pytorch" and again.step == loaded.step
    assert_trees_equal(again.params, loaded.params)
    assert_trees_equal(again.params_ema, loaded.params_ema)
    for a, b in zip(again.adam[:2], loaded.adam[:2], strict=True):
        assert_trees_equal(a, b)
    with pytest.raises(pretrained.PretrainedError, match="exists"):
        pretrained.export_score_sde_pytorch(config, loaded.params, out)


def test_output_and_input_skip_network_round_trips(tmp_path):
    # The pyramid resamplers of output_skip / input_skip hold no parameters but take an index in
    # all_modules; the input pyramid's Combine names its conv `Conv` (score_sde_pytorch
    # models/layerspp.py). Checked once against the reference's own module construction.
    folder = os.path.join(INTEROP, "a2_ve_ncsnpp_skip_continuous", "diffusers")
    config = fixture_config(folder)
    loaded = pretrained.load(folder, config)
    out = pretrained.export_score_sde_pytorch(config, loaded.params, str(tmp_path / "a2.pth"),
                                              loaded.params_ema, step=3)
    keys = list(load_torch_checkpoint(out)["model"])
    assert "module.all_modules.7.Conv.weight" in keys  # Combine_0, after index 6 (no params)
    assert not any(k.startswith("module.all_modules.6.") for k in keys)
    again = pretrained.load(out, config)
    assert again.step == 3 and again.adam is None
    assert_trees_equal(again.params, loaded.params)
    assert_trees_equal(again.params_ema, loaded.params_ema)


def test_export_refuses_networks_score_sde_pytorch_cannot_load(tmp_path):
    config = ncsnv2_cifar10.get_config()
    with pytest.raises(pretrained.PretrainedError, match="'ncsnpp'.*'ddpm'"):
        pretrained.export_score_sde_pytorch(config, {}, str(tmp_path / "x.pth"))
    assert not os.path.exists(tmp_path / "x.pth")


def test_export_mode_on_a_trained_workdir(tmp_path, trained, data_dir):
    config = tiny_test.get_config()
    config.data.data_dir = data_dir
    config.pretrained.format = "score_sde_pytorch"
    config.pretrained.out = str(tmp_path / "out")
    path = interop.export(config, trained["straight"])
    assert path == str(tmp_path / "out" / "checkpoint_2.pth")
    stored = restore_tree(os.path.join(trained["straight"], "checkpoints", "checkpoint_2"))
    loaded = pretrained.load(path, config)
    assert loaded.step == int(stored["step"]) == 12
    assert_trees_equal(loaded.params, stored["params"])
    assert_trees_equal(loaded.params_ema, stored["params_ema"])
    with pytest.raises(interop.UsageError, match="exists"):
        interop.export(config, trained["straight"])
    config.pretrained.format = "onnx"
    with pytest.raises(interop.UsageError, match="'diffusers', 'score_sde_pytorch'"):
        interop.export(config, trained["straight"])


def test_real_torch_loads_the_export(tmp_path):
    torch = pytest.importorskip("torch")
    name = "a_ve_ncsnpp_continuous"
    _, _, out = _export_reference(name, tmp_path)
    got = torch.load(out, map_location="cpu")  # weights_only=True: no code runs
    ref = torch.load(REFERENCE[name], map_location="cpu", weights_only=False)
    assert [(k, tuple(v.shape), v.dtype) for k, v in got["model"].items()] == [
        (k, tuple(v.shape), v.dtype) for k, v in ref["model"].items()]
    # What utils.restore_checkpoint does with the optimizer and EMA, on parameters laid out as
    # the reference model's (model.parameters() order; the Fourier W is not trainable).
    params = [torch.nn.Parameter(v.clone()) for k, v in ref["model"].items()
              if k != "module.sigmas"]
    params[0].requires_grad_(False)
    optimizer = torch.optim.Adam(params, lr=2e-4)
    optimizer.load_state_dict(got["optimizer"])
    assert torch.equal(optimizer.state[params[1]]["exp_avg"],
                       ref["optimizer"]["state"][1]["exp_avg"])
    shadow = got["ema"]["shadow_params"]
    trainable = [p for p in params if p.requires_grad]
    assert [tuple(s.shape) for s in shadow] == [tuple(p.shape) for p in trainable]
    for s, r in zip(shadow, ref["ema"]["shadow_params"], strict=True):
        assert torch.equal(s, r)
