"""get_score_fn label conventions and scalings, with a stub network that records its inputs;
create_model (config -> typed module fields) and init_model's return order."""

import importlib

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import score_model
import sde_lib
from models import param_trees
from models import utils as mutils


class RecordingStub(nn.Module):
    """Outputs `labels` broadcast over the image (or ones), so the caller can read both
    the labels the network was given and how its output was turned into a score."""

    emit_labels: bool = True

    @nn.compact
    def __call__(self, x, labels, train=False):
        self.sow("intermediates", "labels", labels)
        value = labels.astype(jnp.float32) if self.emit_labels else jnp.ones(x.shape[0])
        return jnp.zeros_like(x) + value[:, None, None, None]


T = np.array([1e-3, 0.25, 0.5, 0.999], np.float32)
X = jnp.zeros((4, 2, 2, 1))


def _score(sde, continuous, emit_labels=True):
    score_fn = mutils.get_score_fn(sde, RecordingStub(emit_labels), {}, {},
                                   continuous=continuous)
    return np.asarray(score_fn(X, jnp.asarray(T)))[:, 0, 0, 0]


def test_ve_labels_and_scaling():
    sde = sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=1000)
    sigma = 0.01 * (50.0 / 0.01) ** T
    # continuous: label sigma(t), the output is the score itself
    np.testing.assert_allclose(_score(sde, True), sigma, rtol=1e-5)
    np.testing.assert_allclose(_score(sde, True, emit_labels=False), 1.0)
    # discrete: label round((T - t)(N - 1)) indexes sigmas from sigma_max down
    np.testing.assert_array_equal(_score(sde, False), np.round((1 - T) * 999))


@pytest.mark.parametrize("cls", [sde_lib.VPSDE, sde_lib.subVPSDE])
def test_vp_and_subvp_continuous_labels_and_scaling(cls):
    sde = cls(beta_min=0.1, beta_max=20.0, N=1000)
    log_mean = -0.25 * T**2 * 19.9 - 0.5 * T * 0.1
    std = np.sqrt(1 - np.exp(2 * log_mean)) if cls is sde_lib.VPSDE else 1 - np.exp(2 * log_mean)
    # label 999 t; score = -output / std(t)
    np.testing.assert_allclose(_score(sde, True), -999 * T / std, rtol=1e-4)
    np.testing.assert_allclose(_score(sde, True, emit_labels=False), -1 / std, rtol=1e-4)


def test_vp_discrete_labels_and_scaling():
    sde = sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=1000)
    labels = T * 999
    betas = np.linspace(0.1 / 1000, 20.0 / 1000, 1000)
    std = np.sqrt(1 - np.cumprod(1 - betas))[labels.astype(np.int32)]
    np.testing.assert_allclose(_score(sde, False), -labels / std, rtol=1e-4)


def test_subvp_discrete_uses_the_continuous_convention():
    # As the reference's get_score_fn: sub-VP is treated as continuous whatever `continuous`
    # says (labels 999 t, score = -output / std(t)).
    sde = sde_lib.subVPSDE(beta_min=0.1, beta_max=20.0, N=1000)
    log_mean = -0.25 * T**2 * 19.9 - 0.5 * T * 0.1
    std = 1 - np.exp(2 * log_mean)
    np.testing.assert_allclose(_score(sde, False), -999 * T / std, rtol=1e-4)
    np.testing.assert_allclose(_score(sde, False, emit_labels=False), -1 / std, rtol=1e-4)


class _UnitOU(sde_lib.SDE):
    """A user's SDE without a discrete chain: dx = -x/2 dt + dw."""

    T = 1.0

    def sde(self, x, t):
        return -0.5 * x, jnp.ones_like(t)

    def marginal_prob(self, x, t):
        return sde_lib.batch_mul(jnp.exp(-0.5 * t), x), jnp.sqrt(1 - jnp.exp(-t))

    def prior_sampling(self, rng, shape):
        return jax.random.normal(rng, shape)

    def prior_logp(self, z):
        return -0.5 * jnp.sum(z.reshape(z.shape[0], -1) ** 2, -1)


def test_sde_without_discrete_chain_refuses_discrete_labels():
    with pytest.raises(NotImplementedError, match="_UnitOU has no discrete label convention"):
        _score(_UnitOU(10), False)


def test_a_convention_registered_for_an_sde_class_serves_its_subclasses():
    # A researcher's SDE gets the default convention (999 t, -output / std); registering a
    # ScoreModel subclass for it (or a base class) changes the labels its network sees.
    assert type(score_model.for_sde(_UnitOU(10), None)) is score_model.ScoreModel

    class _Sub(_UnitOU):
        pass

    @score_model.register_convention(_UnitOU)
    class _HalfLabels(score_model.ScoreModel):
        def labels(self, t):
            return t / 2

    try:
        assert type(score_model.for_sde(_Sub(10), None)) is _HalfLabels
        np.testing.assert_allclose(_score(_Sub(10), True), (T / 2) / -np.sqrt(1 - np.exp(-T)),
                                   rtol=1e-5)
    finally:
        score_model._CONVENTIONS.pop(_UnitOU)
    assert type(score_model.for_sde(_VE(), None)) is score_model.VEScoreModel


class _VE(sde_lib.VESDE):
    """A VE subclass keeps the VE convention."""


def test_labels_reach_the_network_unchanged():
    sde = sde_lib.VESDE(N=10)
    model = RecordingStub()
    labels = score_model.for_sde(sde, model, continuous=False).labels(jnp.asarray(T))
    _, state = model.apply({}, X, labels,
                           mutable=["intermediates"])
    np.testing.assert_array_equal(state["intermediates"]["labels"][0], np.round((1 - T) * 9))


# ---------------------------------------------------------------------------------------------
# create_model: the one place that reads a config for a network.


def _config(name):
    return importlib.import_module("configs." + name.replace("/", ".")).get_config()


def test_create_model_fills_typed_fields_from_the_config():
    cfg = _config("ve/cifar10_ncsnpp")  # positional embedding + scale_by_sigma under VE
    model = mutils.create_model(cfg)
    assert type(model) is mutils.get_model("ncsnpp")
    m = cfg.model
    assert (model.nf, model.num_res_blocks, model.dropout) == (m.nf, m.num_res_blocks, m.dropout)
    assert model.ch_mult == tuple(m.ch_mult) and model.fir_kernel == (1, 3, 3, 1)
    assert model.embedding_type == "positional" and model.scale_by_sigma
    assert model.centered is cfg.data.centered is False
    # The derived field: the VE ladder from sigma_max down, as the discrete labels index it.
    want = np.exp(np.linspace(np.log(m.sigma_max), np.log(m.sigma_min), m.num_scales))
    np.testing.assert_allclose(model.sigmas, want, rtol=1e-12)
    assert model.name is None  # config.model.name is the registry name, not a module name


def test_create_model_matches_direct_construction():
    cfg = _config("tiny_test")
    ncsnpp = mutils.get_model("ncsnpp")
    # tiny_test overrides and its Fashion-MNIST defaults; every other field keeps its default.
    kwargs = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(14,), dropout=0.0,
                  fir=False, progressive_input="none", sigmas=tuple(mutils.get_sigmas(cfg)))
    assert mutils.create_model(cfg) == ncsnpp(**kwargs)


@mutils.register_model(name="test_researcher_model")
class ResearcherModel(nn.Module):
    """A user's model whose field names match config keys."""

    nf: int
    centered: bool
    ch_mult: tuple[int, ...] = (1,)
    my_width: int = 3

    @nn.compact
    def __call__(self, x, labels, train=False):
        return nn.Dense(self.nf * self.ch_mult[-1] + self.my_width)(x)


def test_create_model_builds_a_researchers_registered_model():
    cfg = _config("tiny_test")
    cfg.model.name = "test_researcher_model"
    model = mutils.create_model(cfg)
    assert model == ResearcherModel(nf=8, centered=False, ch_mult=(1, 2))  # my_width: default
    params = mutils.param_shapes(cfg)
    assert params["Dense_0"]["kernel"].shape == (1, 8 * 2 + 3)


def test_create_model_names_a_required_field_it_cannot_fill():
    cfg = ml_collections.ConfigDict({"model": {"name": "test_researcher_model", "nf": 4},
                                     "data": {"image_size": 4, "num_channels": 1}})
    with pytest.raises(ValueError, match=r"'test_researcher_model' \(ResearcherModel\) needs "
                                         r"field 'centered'.*\['data.centered'\]"):
        mutils.create_model(cfg)


def test_create_model_refuses_fourier_labels_with_discrete_training():
    cfg = _config("ve/cifar10_ncsnpp_continuous")
    cfg.training.continuous = False
    with pytest.raises(ValueError, match="embedding_type='fourier'.*continuous=False"):
        mutils.create_model(cfg)


@mutils.register_model(name="test_batch_stats_model")
class BatchStatsModel(nn.Module):
    """Has a non-parameter collection, so init_model's order is observable."""

    @nn.compact
    def __call__(self, x, labels, train=False):
        return nn.BatchNorm(use_running_average=not train)(nn.Dense(2)(x))


def test_init_model_returns_the_reference_order():
    cfg = ml_collections.ConfigDict({"model": {"name": "test_batch_stats_model"},
                                     "data": {"image_size": 2, "num_channels": 3}})
    result = mutils.init_model(jax.random.PRNGKey(0), cfg)
    assert result._fields == ("model", "init_model_state", "initial_params")
    model, init_model_state, initial_params = result
    assert isinstance(model, BatchStatsModel)
    assert set(init_model_state) == {"batch_stats"}
    np.testing.assert_array_equal(init_model_state["batch_stats"]["BatchNorm_0"]["var"],
                                  np.ones(2))
    assert set(initial_params) == {"Dense_0", "BatchNorm_0"}
    assert initial_params["Dense_0"]["kernel"].shape == (3, 2)


def test_first_difference_names_the_most_telling_parameter():
    want = {("Dense_0", "kernel"): (3, 2), ("Dense_0", "bias"): (2,),
            ("Fourier_0", "W"): (8,)}
    assert param_trees.first_difference(dict(want), want) is None
    # A whole module on one side comes before a shape difference elsewhere.
    have = {("Dense_0", "kernel"): np.zeros((3, 4)), ("Dense_0", "bias"): np.zeros(2)}
    assert param_trees.first_difference(have, want) == (
        "parameter 'Fourier_0/W' is absent from the checkpoint (shape (8,) in the config)")
    have[("Fourier_0", "W")] = np.zeros(8)
    assert param_trees.first_difference(have, want, sep=".", where="this config") == (
        "parameter 'Dense_0.kernel' has shape (3, 4) in the checkpoint but (3, 2) in this config")
    # `first`: the parameters before the optimizer's moments, though 'opt_state' sorts first.
    state = {("params", "w"): (2,), ("opt_state", "mu", "w"): (2,)}
    stored = {("params", "w"): (3,), ("opt_state", "mu", "w"): (3,)}
    assert "'params/w'" in param_trees.first_difference(stored, state, first=("params",))
    assert "'opt_state/mu/w'" in param_trees.first_difference(stored, state)


def test_leaf_shapes_names_dict_attribute_and_index_keys():
    state = mutils.State(step=np.int32(0), params={"Conv_0": {"kernel": np.zeros((3, 3, 1, 2))}},
                         opt_state=(np.zeros(4), {"mu": np.zeros(5)}), params_ema={},
                         model_state={}, rng=np.zeros(2, np.uint32))
    assert param_trees.leaf_shapes(state) == {
        ("step",): (), ("params", "Conv_0", "kernel"): (3, 3, 1, 2), ("opt_state", "0"): (4,),
        ("opt_state", "1", "mu"): (5,), ("rng",): (2,)}


def test_classifier_checkpoint_of_other_sizes_is_refused_naming_the_parameter(tmp_path):
    classifier = mutils.create_classifier_module(ml_collections.ConfigDict(
        {"classifier": {"blocks_per_group": 1, "channel_multiplier": 1, "num_classes": 3}}))
    params = mutils.init_classifier_params(classifier, jax.random.PRNGKey(0), (8, 8, 1))
    path = tmp_path / "classifier.msgpack"
    path.write_bytes(flax.serialization.to_bytes(params))
    again = mutils.load_classifier_params(str(path), params)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(again),
                    strict=True):
        np.testing.assert_array_equal(a, b)
    other = mutils.init_classifier_params(
        mutils.create_classifier_module(ml_collections.ConfigDict(
            {"classifier": {"blocks_per_group": 1, "channel_multiplier": 1, "num_classes": 4}})),
        jax.random.PRNGKey(0), (8, 8, 1))
    with pytest.raises(ValueError, match=r"does not match the classifier's config: parameter "
                                         r"'[^']*/bias' has shape \(3,\) in the checkpoint but "
                                         r"\(4,\) in the config"):
        mutils.load_classifier_params(str(path), other)


def test_utils_keeps_every_reference_name():
    for name in ("register_model", "get_model", "registered_models", "create_model",
                 "model_kwargs", "get_sigmas", "init_model", "InitializedModel", "param_shapes",
                 "count_params", "get_model_fn", "get_score_fn", "State",
                 "create_classifier_module", "init_classifier_params",
                 "load_classifier_params", "create_classifier", "_dummy_inputs", "_MODELS"):
        assert hasattr(mutils, name), name
    assert mutils.get_model("test_batch_stats_model") is BatchStatsModel
    assert mutils._MODELS["test_batch_stats_model"] is BatchStatsModel
