"""docs/extending.md, executed: its plugin files are extracted into a temporary folder and run.

In process: the registries' errors list their names, `get_sde` fills constructor arguments by
name, a plugin's config key is set from the command line (absl's own parser), the examples'
SDE, predictor, corrector and sampler sample Gaussian data with its exact score, and a bad
plugin gives one line. Through `main.py` (subprocesses): training with the plugin SDE, network,
predictor and corrector, then `--mode=sample` with the plugin sampler without repeating
`--config.plugins`, and a missing plugin file.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from gaussian_utils import GaussianMixture
from ml_collections.config_flags import config_flags
from run_helpers import ROOT, main_args, run

import configs
import run_lib
import sampling
import sde_lib
from configs import plugins, presets, tiny_test
from models import utils as mutils

DOC = os.path.join(ROOT, "docs", "extending.md")
EXAMPLE = re.compile(r"^File `(?P<name>[\w.]+)`:\n\n```python\n(?P<code>.*?)^```$", re.M | re.S)
FILES = ("power_ve.py", "eta_euler.py", "steady_langevin.py", "pf_euler.py", "tiny_net.py",
         "discs.py")
# What the examples register, as the two documented commands name them.
PLUGIN_CONFIG = ("--config.training.sde=power_ve", "--config.model.name=tiny_net")


@pytest.fixture(scope="module")
def examples(tmp_path_factory) -> dict[str, str]:
    """The plugin files of docs/extending.md, written once and imported once (in process)."""
    with open(DOC) as f:
        found = {m["name"]: m["code"] for m in EXAMPLE.finditer(f.read())}
    assert sorted(found) == sorted(FILES)
    folder = tmp_path_factory.mktemp("extending")
    paths = {}
    for name, code in found.items():
        paths[name] = str(folder / name)
        with open(paths[name], "w") as f:
            f.write(code)
    plugins.load(",".join(paths.values()))
    return paths


def _tiny_plugin_config(examples):
    config = tiny_test.get_config()
    config.plugins = ",".join(examples.values())
    config.training.sde, config.model.name = "power_ve", "tiny_net"
    config.sampling.predictor, config.sampling.corrector = "eta_euler", "steady_langevin"
    return configs.complete(config)


def test_the_page_has_one_example_per_component_and_the_dataset_heading():
    with open(DOC) as f:
        text = f.read()
    assert "## A new dataset" in text and "datasets.register_dataset" in text
    for heading in ("SDE", "predictor", "corrector", "sampler", "network", "dataset"):
        assert f"## A new {heading}" in text


def test_unknown_names_list_each_registry(examples):
    with pytest.raises(ValueError, match=r"Unknown SDE 'nope'; valid names: \['vesde', 'vpsde', "
                                         r"'subvpsde'.*'power_ve'"):
        sde_lib.get_sde_class("nope")
    with pytest.raises(ValueError, match=r"Unknown predictor 'nope'.*'eta_euler'.*'none'"):
        sampling.get_predictor("nope")
    with pytest.raises(ValueError, match=r"Unknown corrector 'nope'.*'langevin'.*'steady_"):
        sampling.get_corrector("nope")
    with pytest.raises(ValueError, match=r"'ddim'.*'heun'.*'ode'.*'pc'.*'pf_euler'"):
        sampling.get_sampler("nope")
    with pytest.raises(ValueError, match=r"Unknown model 'nope'.*'ncsnpp'.*'tiny_net'"):
        mutils.get_model("nope")
    assert sde_lib.get_sde_class("POWER_VE").__name__ == "PowerVESDE"  # case as the reference
    with pytest.raises(ValueError, match="already registered"):
        sde_lib.register_sde(type("Other", (sde_lib.VESDE,), {}), name="power_ve")
    with pytest.raises(TypeError, match="SDE subclass"):
        sde_lib.register_sde(object, name="not_an_sde")
    # The presets' recipes are for registered names; other registered names are accepted.
    assert set(presets._RECIPES) <= set(sde_lib.registered_sdes())
    config = configs.project_defaults()
    presets.sde(config, "power_ve")
    assert config.training.sde == "power_ve" and config.training.continuous
    with pytest.raises(ValueError, match=r"'vesde', 'vpsde', 'subvpsde'.*'power_ve'"):
        presets.sde(config, "ve")


def test_get_sde_fills_constructor_arguments_by_name(examples):
    model = ml_collections.ConfigDict(dict(sigma_min=0.02, sigma_max=30.0, num_scales=77,
                                           beta_max=12.0, sigma_power=2.0))
    config = ml_collections.ConfigDict(dict(training=dict(sde="vesde"), model=model))
    ve = sde_lib.get_sde(config)
    assert (ve.sigma_min, ve.sigma_max, ve.N) == (0.02, 30.0, 77)
    config.training.sde = "subvpsde"
    subvp = sde_lib.get_sde(config)  # no beta_min in the config: the constructor's 0.1
    assert (subvp.beta_0, subvp.beta_1, subvp.N) == (0.1, 12.0, 77)
    config.training.sde = "power_ve"
    power = sde_lib.get_sde(config)
    assert (power.sigma_max, power.sigma_power, power.N) == (30.0, 2.0, 77)
    np.testing.assert_allclose(power.marginal_prob(jnp.zeros((1, 1)), jnp.array([0.5]))[1],
                               [30.0 * 0.25], rtol=1e-6)

    class NeedsKappa(sde_lib.VESDE):
        def __init__(self, kappa, N=1000):
            super().__init__(N=N)

    sde_lib.register_sde(NeedsKappa, name="test_only_needs_kappa")
    try:
        config.training.sde = "test_only_needs_kappa"
        with pytest.raises(ValueError, match="needs argument 'kappa'.*model.kappa"):
            sde_lib.get_sde(config)
        config.model.kappa = 3.0
        assert sde_lib.get_sde(config).N == 77
    finally:
        sde_lib._SDES.pop("test_only_needs_kappa")


def test_a_plugin_key_is_set_from_the_command_line(examples, tmp_path, monkeypatch):
    # main.py's --config flag on a fresh flag set: absl applies the overrides from sys.argv.
    def parse(*args):
        argv = ["main.py", f"--config={os.path.join(ROOT, 'configs', 'tiny_test.py')}", *args]
        monkeypatch.setattr(sys, "argv", argv)
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=values)
        plugins.install(values["config"])
        values(argv, known_only=True)
        return values.config

    power = examples["power_ve.py"]
    config = parse(f"--config.plugins={power}", "--config.training.sde=power_ve",
                   "--config.model.sigma_power=2.0")
    assert config.model.sigma_power == 2.0 and config.plugins == power
    assert sde_lib.get_sde(config).sigma_power == 2.0
    with pytest.raises(AttributeError):  # the config stays locked
        config.model.sigma_powr = 1.0
    # A later command on the workdir imports what the first recorded, plus its own plugins.
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"plugins": power}))
    config = parse(f"--workdir={workdir}", f"--config.plugins={examples['tiny_net.py']}")
    plugins.record(config, str(workdir))
    assert config.plugins == f"{power},{examples['tiny_net.py']}"
    # Relative paths are recorded absolute; repeats are dropped.
    monkeypatch.chdir(os.path.dirname(power))
    assert plugins.normalize("power_ve.py", f" {power} ,,") == power


def test_the_examples_sample_gaussian_data(examples):
    sde = sde_lib.get_sde_class("power_ve")(sigma_max=10.0, N=400)
    # Consistent maths: g(t)^2 = d sigma(t)^2 / dt, and the prior is p_T of data near 0.
    t = jnp.linspace(0.05, 0.95, 19)
    h = 1e-3
    var = lambda t: np.asarray(sde.marginal_prob(jnp.zeros((len(t), 1)), t)[1], np.float64) ** 2
    np.testing.assert_allclose((var(t + h) - var(t - h)) / (2 * h),
                               np.asarray(sde.sde(jnp.zeros((19, 1)), t)[1]) ** 2, rtol=1e-3)
    z = jnp.ones((2, 3))
    np.testing.assert_allclose(sde.prior_logp(z), jax.scipy.stats.norm.logpdf(
        np.ones((2, 3)), scale=10.0).sum(-1), rtol=1e-5)

    mu, s, n = np.array([0.5, -0.3, 0.2, 0.0]), 0.2, 4000
    data = GaussianMixture.gaussian(mu, s)
    score_fn = data.score_fn(sde)
    pc = sampling.get_pc_sampler(sde, (n, 4), "eta_euler", "steady_langevin",
                                 lambda x: x, snr=0.05, eps=sde.sampling_eps)
    config = ml_collections.ConfigDict(dict(sampling=dict(method="pf_euler", num_steps=200)))
    ode = sampling.get_sampling_fn(config, sde, (n, 4), lambda x: x, sde.sampling_eps)
    for name, sampler in (("pc", pc), ("pf_euler", ode)):
        x, nfe = sampler(jax.random.key(3), score_fn)
        x = np.asarray(x, np.float64)
        assert nfe == {"pc": 2 * 400, "pf_euler": 200}[name]
        # The sampling error of n draws (4 standard errors) plus 5% of s for the discretization.
        np.testing.assert_array_less(np.abs(x.mean(0) - mu), 4 * s / np.sqrt(n) + 0.05 * s,
                                     err_msg=name)
        np.testing.assert_array_less(np.abs(x.std(0) - s), 4 * s / np.sqrt(2 * n) + 0.05 * s,
                                     err_msg=name)


def test_the_example_dataset_feeds_the_pipeline(examples):
    import datasets

    config = tiny_test.get_config()
    config.data.dataset = "discs"
    assert "discs" in datasets.valid_names()
    train_ds, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
    batch = next(iter(eval_ds))
    images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
    assert images.shape == (config.eval.batch_size, 28, 28, 1)
    # Discs: every pixel black or white (no resize at the native size), classes 0-2.
    assert set(np.unique(images)) <= {0.0, 1.0} and images.max() == 1.0
    assert set(labels.tolist()) <= {0, 1, 2}
    # A disc of radius r covers about pi r^2 pixels: the class follows the white area.
    area = images.reshape(len(images), -1).sum(1) / 28**2
    np.testing.assert_array_less(area[labels == 0], np.pi * 0.23**2 + 0.02)
    np.testing.assert_array_less(np.pi * 0.23**2 - 0.02, area[labels >= 1])
    config.data.num_channels = 3
    with pytest.raises(run_lib.ConfigError, match="num_channels=3 but discs has 1 channel"):
        run_lib.validate_config(config)


def test_validation_accepts_the_plugins_and_names_what_they_cannot_do(examples):
    config = _tiny_plugin_config(examples)
    run_lib.validate_config(config)
    config.training.continuous = False
    with pytest.raises(run_lib.ConfigError, match=r"continuous=False needs an SDE with a "
                                                  r"discrete objective.*\['vesde', 'vpsde'\], "
                                                  r"got 'power_ve'"):
        run_lib.validate_config(config)


def test_a_failing_plugin_is_one_line_naming_it(tmp_path):
    bad = tmp_path / "broken_plugin.py"
    bad.write_text("import sde_lib\n\nraise RuntimeError('half written')\n")
    with pytest.raises(plugins.PluginError) as err:
        plugins.load(str(bad))
    assert str(err.value) == (f"config.plugins: plugin '{bad}' failed to import (line 3): "
                              "RuntimeError: half written")
    config = tiny_test.get_config()
    config.plugins = "no_such_plugin_module"
    with pytest.raises(run_lib.ConfigError, match="no such plugin 'no_such_plugin_module'"):
        run_lib.validate_config(config)
    # A plugin file a workdir recorded and that was deleted since: the message says where.
    workdir = tmp_path / "recorded"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"plugins": f"{tmp_path}/gone.py"}))
    config.plugins = ""
    with pytest.raises(plugins.PluginError) as err:
        plugins.record(config, str(workdir))
    assert str(err.value) == (f"config.plugins: no such plugin file '{tmp_path}/gone.py' "
                              f"(recorded in {workdir}/config.json).")
    # Through main.py: one line and exit code 2, before JAX starts and before the workdir.
    workdir = str(tmp_path / "w")
    t0 = time.time()
    proc = run(main_args("train", workdir, str(tmp_path), f"--config.plugins={bad}x"), ok=False)
    assert proc.returncode == 2 and time.time() - t0 < 60
    assert proc.stderr.strip() == f"error: config.plugins: no such plugin file '{bad}x'."
    assert not os.path.exists(workdir)


def test_train_then_sample_through_main_with_the_plugins(examples, data_dir, tmp_path):
    workdir = str(tmp_path / "w")
    run(main_args("train", workdir, data_dir, f"--config.plugins={','.join(examples.values())}",
                  *PLUGIN_CONFIG, "--config.model.sigma_power=1.0", "--config.data.dataset=discs",
                  "--config.sampling.predictor=eta_euler",
                  "--config.sampling.corrector=steady_langevin"))
    with open(os.path.join(workdir, "config.json")) as f:
        recorded = json.load(f)
    assert recorded["plugins"] == ",".join(examples.values())
    assert (recorded["training"]["sde"], recorded["model"]["name"]) == ("power_ve", "tiny_net")
    assert recorded["data"]["dataset"] == "discs"
    # The snapshot grids came from the PC sampler with the plugin predictor and corrector.
    snapshots = os.listdir(os.path.join(workdir, "samples"))
    assert snapshots
    for folder in snapshots:
        grid = np.load(os.path.join(workdir, "samples", folder, "sample.npz"))["samples"]
        assert grid.shape[1:] == (28, 28, 1)
    # No --config.plugins: the workdir's config.json names them.
    proc = run(main_args("sample", workdir, data_dir, *PLUGIN_CONFIG,
                         "--config.sampling.method=pf_euler", "--config.sampling.num_steps=10"))
    assert "(pf_euler)" in proc.stderr and "10 NFE per batch" in proc.stderr
    (ckpt,) = os.listdir(os.path.join(workdir, "sample"))
    samples = np.load(os.path.join(workdir, "sample", ckpt, "samples.npz"))["samples"]
    assert samples.shape == (16, 28, 28, 1) and samples.dtype == np.uint8
    assert samples.std() > 0  # not a constant image


def test_a_plugin_given_as_a_module_name(tmp_path, monkeypatch):
    (tmp_path / "my_lab").mkdir()
    (tmp_path / "my_lab" / "__init__.py").write_text("")
    (tmp_path / "my_lab" / "samplers.py").write_text(
        "import sampling\n\n\n@sampling.register_sampler(name='test_only_module_sampler')\n"
        "def factory(config, sde, shape, inverse_scaler, eps):\n    return None\n")
    (tmp_path / "my_lab" / "broken.py").write_text("import numpy\nnumpy.nope\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        (module,) = plugins.load(" my_lab.samplers ")
        assert sampling.get_sampler("test_only_module_sampler") is module.factory
        assert plugins.normalize("my_lab.samplers") == "my_lab.samplers"  # not a path
    finally:
        sampling._SAMPLERS.pop("test_only_module_sampler", None)
    with pytest.raises(plugins.PluginError, match=r"'my_lab.broken' failed to import \(line 2\): "
                                                  r"AttributeError: module 'numpy' has no attr"):
        plugins.load("my_lab.broken")
    with pytest.raises(plugins.PluginError, match=r"no such plugin 'my_lab.missing' \(neither"):
        plugins.load("my_lab.missing")
