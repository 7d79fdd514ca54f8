"""NCSN (v1), NCSNv2 and the noise-conditional WideResNet classifier.

Parameter counts are checked against the reference implementation's (yang-song/score_sde)
through jax.eval_shape; real forward/backward runs use the real configs with a small nf.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import configs.ve.ncsn.cifar10 as ncsn_cifar10
import configs.ve.ncsnv2.bedroom as ncsnv2_bedroom
import configs.ve.ncsnv2.cifar10 as ncsnv2_cifar10
import sde_lib
from models import layers, normalization
from models.utils import (
    count_params,
    create_model,
    get_model,
    get_sigmas,
    init_model,
    param_shapes,
)

EPS = 1e-5


# ---------------------------------------------------------------------------------------
# Normalizations against direct numpy formulas.
# ---------------------------------------------------------------------------------------


def _np_instance_norm_plus(x, gamma, alpha, beta):
    """InstanceNorm++ (Song & Ermon 2019, Eq. 6); gamma, alpha, beta broadcast as [B|1, C]."""
    x = np.asarray(x, np.float64)
    mu = x.mean(axis=(1, 2))  # [B, C]
    s2 = x.var(axis=(1, 2))
    m = mu.mean(axis=1, keepdims=True)
    v = mu.var(axis=1, keepdims=True)
    h = (x - mu[:, None, None]) / np.sqrt(s2[:, None, None] + EPS)
    h = h + ((mu - m) / np.sqrt(v + EPS) * alpha)[:, None, None]
    return gamma[:, None, None] * h + beta[:, None, None]


def _random_params(variables, rng):
    """Replaces every parameter by a random value so the test does not rely on init values."""
    leaves, treedef = jax.tree_util.tree_flatten(variables)
    keys = jax.random.split(rng, len(leaves))
    new = [jax.random.normal(k, leaf.shape) for k, leaf in zip(keys, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, new)


def _image(rng, shape=(2, 5, 6, 4)):
    # Channel offsets make the channel means differ, which the "++" term is about.
    return jax.random.normal(rng, shape) * 2.0 + jnp.arange(shape[-1], dtype=jnp.float32)


def test_instance_norm_plus_matches_numpy():
    x = _image(jax.random.PRNGKey(0))
    module = normalization.InstanceNorm2dPlus()
    variables = _random_params(module.init(jax.random.PRNGKey(1), x), jax.random.PRNGKey(2))
    p = variables["params"]
    expected = _np_instance_norm_plus(x, np.asarray(p["gamma"])[None],
                                      np.asarray(p["alpha"])[None], np.asarray(p["beta"])[None])
    np.testing.assert_allclose(module.apply(variables, x), expected, rtol=1e-4, atol=1e-4)


def test_instance_norm_and_variance_norm_match_numpy():
    x = _image(jax.random.PRNGKey(3))
    xn = np.asarray(x, np.float64)
    mu, s2 = xn.mean(axis=(1, 2), keepdims=True), xn.var(axis=(1, 2), keepdims=True)

    module = normalization.InstanceNorm2d()
    variables = _random_params(module.init(jax.random.PRNGKey(4), x), jax.random.PRNGKey(5))
    p = variables["params"]
    expected = (xn - mu) / np.sqrt(s2 + EPS) * np.asarray(p["scale"]) + np.asarray(p["bias"])
    np.testing.assert_allclose(module.apply(variables, x), expected, rtol=1e-4, atol=1e-4)

    module = normalization.VarianceNorm2d()
    variables = _random_params(module.init(jax.random.PRNGKey(6), x), jax.random.PRNGKey(7))
    expected = xn / np.sqrt(s2 + EPS) * np.asarray(variables["params"]["scale"])
    np.testing.assert_allclose(module.apply(variables, x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape,groups", [((3, 5, 6, 8), 2), ((2, 4, 4, 64), 32),
                                          ((2, 7, 12), 3)])
def test_group_norm_matches_numpy_and_flax_in_value_and_derivatives(shape, groups):
    import flax.linen as nn

    x = _image(jax.random.PRNGKey(20), shape) * 3.0 + 5.0
    module = normalization.GroupNorm(num_groups=groups, epsilon=1e-6)
    variables = _random_params(module.init(jax.random.PRNGKey(21), x), jax.random.PRNGKey(22))
    p = {k: np.asarray(v, np.float64) for k, v in variables["params"].items()}
    assert set(p) == {"scale", "bias"} and p["scale"].shape == (shape[-1],)
    xn = np.asarray(x, np.float64).reshape(shape[0], -1, groups, shape[-1] // groups)
    mu, s2 = xn.mean(axis=(1, 3), keepdims=True), xn.var(axis=(1, 3), keepdims=True)
    expected = ((xn - mu) / np.sqrt(s2 + 1e-6)).reshape(shape) * p["scale"] + p["bias"]
    np.testing.assert_allclose(module.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
    # Parameters, value, gradient and JVP as flax.linen.GroupNorm's (two-pass variance, as
    # ours), for checkpoints and the likelihood's divergence (forward mode) alike.
    ref = nn.GroupNorm(num_groups=groups, epsilon=1e-6, use_fast_variance=False)
    assert jax.tree_util.tree_map(jnp.shape, ref.init(jax.random.PRNGKey(21), x)) == \
        jax.tree_util.tree_map(jnp.shape, variables)
    w = jax.random.normal(jax.random.PRNGKey(23), shape)

    def loss(m):
        return lambda v, x: jnp.sum(jnp.tanh(m.apply(v, x)) * w)
    for ours, theirs in zip(jax.tree_util.tree_leaves(jax.grad(loss(module), (0, 1))(variables, x)),
                            jax.tree_util.tree_leaves(jax.grad(loss(ref), (0, 1))(variables, x)),
                            strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())
    t = jax.random.normal(jax.random.PRNGKey(24), shape)
    ours = jax.jvp(lambda x: module.apply(variables, x), (x,), (t,))[1]
    theirs = jax.jvp(lambda x: ref.apply(variables, x), (x,), (t,))[1]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())


def test_group_norm_refuses_channels_that_do_not_split_into_groups():
    with pytest.raises(ValueError, match="6 channels.*num_groups=4"):
        normalization.GroupNorm(num_groups=4).init(jax.random.PRNGKey(0), jnp.ones((1, 2, 2, 6)))


@pytest.mark.parametrize("bias", [True, False])
def test_conditional_instance_norm_plus_matches_numpy(bias):
    num_classes, c = 4, 3
    x = _image(jax.random.PRNGKey(8), (3, 4, 5, c))
    y = jnp.array([2, 0, 2])
    module = normalization.ConditionalInstanceNorm2dPlus(num_classes=num_classes, bias=bias)
    variables = _random_params(module.init(jax.random.PRNGKey(9), x, y), jax.random.PRNGKey(10))
    table = np.asarray(jax.tree_util.tree_leaves(variables)[0])
    assert table.shape == (num_classes, (3 if bias else 2) * c)
    rows = table[np.asarray(y)]
    beta = rows[:, 2 * c:] if bias else np.zeros((3, c))
    expected = _np_instance_norm_plus(x, rows[:, :c], rows[:, c:2 * c], beta)
    np.testing.assert_allclose(module.apply(variables, x, y), expected, rtol=1e-4, atol=1e-4)
    # Float labels (as models.utils.init_model passes) index the same rows.
    np.testing.assert_allclose(module.apply(variables, x, y.astype(jnp.float32)), expected,
                               rtol=1e-4, atol=1e-4)


def test_conditional_instance_norm_plus_init():
    c = 8
    x = _image(jax.random.PRNGKey(11), (2, 4, 4, c))
    module = normalization.ConditionalInstanceNorm2dPlus(num_classes=5)
    table = np.asarray(jax.tree_util.tree_leaves(module.init(jax.random.PRNGKey(12), x,
                                                             jnp.zeros(2, jnp.int32)))[0])
    # gamma, alpha ~ N(1, 0.02^2); beta = 0: the layer starts as (nearly) InstanceNorm++.
    assert np.all(np.abs(table[:, :2 * c] - 1.0) < 0.2)
    assert np.std(table[:, :2 * c]) > 1e-3
    assert np.all(table[:, 2 * c:] == 0.0)


def test_get_normalization_names():
    assert normalization.get_normalization("InstanceNorm++") is normalization.InstanceNorm2dPlus
    cond = normalization.get_normalization("InstanceNorm++", conditional=True, num_classes=7)
    assert cond().num_classes == 7  # one class per noise level
    with pytest.raises(ValueError, match="num_classes"):
        normalization.get_normalization("InstanceNorm++", conditional=True)
    with pytest.raises(ValueError, match="InstanceNorm\\+\\+"):
        normalization.get_normalization("BatchNorm")
    with pytest.raises(ValueError, match="InstanceNorm\\+\\+"):
        normalization.get_normalization("BatchNorm", conditional=True)


# ---------------------------------------------------------------------------------------
# RefineNet blocks.
# ---------------------------------------------------------------------------------------


def _shape_of(module, *args):
    out, _ = jax.eval_shape(lambda: module.init_with_output(jax.random.PRNGKey(0), *args))
    return out.shape


@pytest.mark.parametrize("resample,dilation,out_hw", [(None, 1, 8), ("down", 1, 4),
                                                      ("down", 2, 8), (None, 4, 8)])
def test_residual_block_shapes(resample, dilation, out_hw):
    x = jnp.zeros((2, 8, 8, 4))
    y = jnp.zeros((2,), jnp.int32)
    block = layers.ResidualBlock(6, normalization.InstanceNorm2dPlus, resample=resample,
                                 dilation=dilation)
    assert _shape_of(block, x) == (2, out_hw, out_hw, 6)
    cond_norm = lambda: normalization.ConditionalInstanceNorm2dPlus(num_classes=3)
    block = layers.ConditionalResidualBlock(6, cond_norm, resample=resample, dilation=dilation)
    assert _shape_of(block, x, y) == (2, out_hw, out_hw, 6)


def test_mean_pool_blocks_average_2x2():
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 6, 2))
    expected = np.asarray(x).reshape(1, 2, 2, 3, 2, 2).mean(axis=(2, 4))
    block = layers.MeanPoolConv(3, kernel_size=1)
    variables = block.init(jax.random.PRNGKey(1), x)
    p = variables["params"]["Conv_0"]
    np.testing.assert_allclose(block.apply(variables, x),
                               expected @ np.asarray(p["kernel"])[0, 0] + np.asarray(p["bias"]),
                               rtol=1e-5, atol=1e-5)
    # A 1x1 convolution commutes with mean pooling, so both orders agree.
    np.testing.assert_allclose(layers.ConvMeanPool(3, kernel_size=1).apply(variables, x),
                               block.apply(variables, x), rtol=1e-5, atol=1e-5)


def test_refine_block_fuses_to_output_shape():
    coarse, fine = jnp.ones((1, 4, 4, 8)), jnp.ones((1, 8, 8, 4))
    block = layers.RefineBlock((8, 8), 4)
    assert _shape_of(block, [fine, coarse]) == (1, 8, 8, 4)
    norm = lambda: normalization.ConditionalInstanceNorm2dPlus(num_classes=2)
    block = layers.CondRefineBlock((8, 8), 4, norm, end=True)
    assert _shape_of(block, [fine, coarse], jnp.zeros(1, jnp.int32)) == (1, 8, 8, 4)


# ---------------------------------------------------------------------------------------
# Full networks.
# ---------------------------------------------------------------------------------------


def _wrn_config(**model):
    cfg = ml_collections.ConfigDict()
    cfg.data = ml_collections.ConfigDict({"image_size": 32, "num_channels": 3})
    cfg.model = ml_collections.ConfigDict({"name": "wideresnet_noise_conditional",
                                           "num_classes": 10, **model})
    return cfg


@pytest.mark.parametrize("get_config,expected", [
    (ncsnv2_cifar10.get_config, 33_970_563),
    (ncsn_cifar10.get_config, 34_428_675),
    (lambda: _wrn_config(), 38_913_242),  # WRN-28-10
])
def test_reference_parameter_counts(get_config, expected):
    assert count_params(param_shapes(get_config())) == expected


def test_get_sigmas_geometric():
    cfg = ncsnv2_cifar10.get_config()
    sigmas = get_sigmas(cfg)
    assert sigmas.shape == (232,)
    np.testing.assert_allclose([sigmas[0], sigmas[-1]], [50.0, 0.01], rtol=1e-12)
    ratios = sigmas[1:] / sigmas[:-1]
    np.testing.assert_allclose(ratios, ratios[0], rtol=1e-10)
    # One ladder: the SDE's discrete sigmas, listed from sigma_max down.
    sde = sde_lib.get_sde(cfg)
    np.testing.assert_array_equal(sigmas.astype(np.float32), np.asarray(sde.discrete_sigmas)[::-1])
    # ...and the one the network divides by.
    assert create_model(cfg).sigmas == tuple(sigmas)


def _small(get_config, nf, image_size=None, **model):
    cfg = get_config()
    cfg.model.nf = nf
    cfg.model.update(model)
    if image_size is not None:
        cfg.data.image_size = image_size
    return cfg


def _cheap_params(cfg, seed=0):
    """Random parameters of the configured model's shapes, without running its init.

    Initializing a RefineNet compiles hundreds of small ops; tests that only need sensible
    finite weights draw them here instead (fan-in scaled kernels, scales near 1).
    """
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        z = rng.standard_normal(leaf.shape).astype(np.float32)
        if name == "kernel":
            return jnp.asarray(z / np.sqrt(np.prod(leaf.shape[:-1])))
        if name in ("embedding", "gamma", "alpha", "scale"):
            return jnp.asarray(1.0 + 0.1 * z)
        if name == "W":  # Fourier frequencies
            return jnp.asarray(16.0 * z)
        return jnp.asarray(0.1 * z)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


def _loss_fn(model):
    """jit(value_and_grad) of mean(output^2) in the parameters; aux = the output."""

    def loss(params, x, labels):
        out = model.apply({"params": params}, x, labels, train=True)
        return jnp.mean(out**2), out

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def _check_forward_backward(loss_and_grad, params, x, labels):
    (value, out), grads = loss_and_grad(params, x, labels)
    assert out.shape == x.shape
    assert np.isfinite(float(value)) and bool(jnp.all(jnp.isfinite(out)))
    leaves = jax.tree_util.tree_leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
    return out


def test_ncsnv2_64_init_forward_backward_and_sigma_scaling():
    cfg = _small(ncsnv2_cifar10.get_config, 4)
    model, states, params = init_model(jax.random.PRNGKey(0), cfg)  # the real initializers
    assert states == {}
    x = jax.random.uniform(jax.random.PRNGKey(1), (1, 32, 32, 3))
    labels = jnp.array([0, 100, 231])
    out = _check_forward_backward(_loss_fn(model), params, jnp.tile(x, (3, 1, 1, 1)),
                                 labels)
    # NCSNv2 is unconditional and divides by sigma of the label: out * sigma is the same for
    # every label of one image.
    sigmas = np.exp(np.linspace(np.log(50.0), np.log(0.01), 232))[np.asarray(labels)]
    raw = np.asarray(out) * sigmas[:, None, None, None]
    np.testing.assert_allclose(raw[1:], np.broadcast_to(raw[:1], raw[1:].shape),
                               rtol=1e-4, atol=1e-5)
    assert np.std(raw) > 1e-3


def test_non_centered_input_is_mapped_to_minus_one_one():
    # Same config (and batch of 1) as models.utils.init_model's call, so eager application
    # reuses the ops compiled for initialization.
    cfg = _small(ncsnv2_cifar10.get_config, 4)
    assert not cfg.data.centered
    model, _, params = init_model(jax.random.PRNGKey(0), cfg)
    centered_cfg = _small(ncsnv2_cifar10.get_config, 4)
    centered_cfg.data.centered = True
    centered = create_model(centered_cfg)
    x = jax.random.uniform(jax.random.PRNGKey(3), (1, 32, 32, 3))
    labels = jnp.array([5])
    np.testing.assert_allclose(model.apply({"params": params}, x, labels),
                               centered.apply({"params": params}, 2 * x - 1, labels),
                               rtol=1e-5, atol=1e-5)


def test_ncsn_forward_backward_is_noise_conditional_per_example():
    cfg = _small(ncsn_cifar10.get_config, 4)
    model = create_model(cfg)
    params = _cheap_params(cfg)
    x = jax.random.uniform(jax.random.PRNGKey(4), (2, 32, 32, 3))
    loss_and_grad = _loss_fn(model)  # compiled once, called twice
    out_a = _check_forward_backward(loss_and_grad, params, x, jnp.array([1, 3]))
    (_, out_b), _ = loss_and_grad(params, x, jnp.array([1, 7]))
    # Example 0 keeps its label: unchanged. Example 1's label changed: its output changes.
    np.testing.assert_allclose(out_a[0], out_b[0], rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(out_a[1] - out_b[1]))) > 1e-4


def _ncsn_20_levels(num_classes):
    """ve/ncsn/cifar10 (10 levels) with --config.model.num_scales=20, a small width, and
    config.model.num_classes set to `num_classes` (None: key removed)."""
    cfg = _small(ncsn_cifar10.get_config, 4, num_scales=20)
    with cfg.unlocked():
        if num_classes is None:
            if "num_classes" in cfg.model:
                del cfg.model["num_classes"]
        else:
            cfg.model.num_classes = num_classes  # as a reference-format config has it
    return cfg


@pytest.mark.parametrize("num_classes", [None, 20])
def test_ncsn_embeds_one_row_per_noise_level(num_classes):
    cfg = _ncsn_20_levels(num_classes)
    model = create_model(cfg)
    assert model.num_scales == 20
    tables = [leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(param_shapes(cfg))
              if path[-1].key == "embedding"]
    assert tables and all(shape[0] == 20 for shape in tables)
    # Labels 10..19 used to fall off a 10-row table (NaN); now they are ordinary levels.
    params = _cheap_params(cfg)
    x = jax.random.uniform(jax.random.PRNGKey(4), (2, 32, 32, 3))
    out = model.apply({"params": params}, x, jnp.array([12, 19]))
    assert bool(jnp.all(jnp.isfinite(out)))


def test_ncsn_refuses_num_classes_other_than_num_scales():
    with pytest.raises(ValueError, match=r"num_scales=20.*num_classes=10"):
        create_model(_ncsn_20_levels(10))
    # NCSNv2 has the same family of noise-level fields (the reference's file sets 232).
    cfg = _small(ncsnv2_cifar10.get_config, 4, num_scales=100)
    with cfg.unlocked():
        cfg.model.num_classes = 232
    with pytest.raises(ValueError, match=r"'ncsnv2_64'.*num_scales=100.*num_classes=232"):
        param_shapes(cfg)


def test_ncsnv2_128_forward_backward():
    cfg = _small(ncsnv2_bedroom.get_config, 2)
    assert cfg.model.name == "ncsnv2_128" and cfg.data.image_size == 128
    model = create_model(cfg)
    x = jax.random.uniform(jax.random.PRNGKey(5), (1, 128, 128, 3))
    _check_forward_backward(_loss_fn(model), _cheap_params(cfg), x, jnp.array([1085]))


def test_ncsnv2_256_forward_backward_shapes():
    # No reference config uses the 256 px network; LSUN bedroom at 256 px stands in. A real
    # run is too slow for this suite, so only shapes are traced (jax.eval_shape).
    cfg = _small(ncsnv2_bedroom.get_config, 128, image_size=256, name="ncsnv2_256")
    model = create_model(cfg)
    params = param_shapes(cfg)
    x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
    labels = jax.ShapeDtypeStruct((2,), jnp.int32)
    (value, out), grads = jax.eval_shape(_loss_fn(model), params, x, labels)
    assert value.shape == () and out.shape == (2, 256, 256, 3)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert all(g.shape == p.shape for g, p in zip(jax.tree_util.tree_leaves(grads),
                                                  jax.tree_util.tree_leaves(params),
                                                  strict=True))


def test_wideresnet_logits_and_fixed_fourier_features():
    cfg = _wrn_config(blocks_per_group=1, channel_multiplier=1)
    model = create_model(cfg)
    params = _cheap_params(cfg)
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))

    @jax.jit
    def loss_and_grad(p, sigmas):
        def loss(p):
            logits = model.apply({"params": p}, x, sigmas, train=True)
            return jax.nn.logsumexp(logits, axis=-1).sum() - logits[:, 3].sum(), logits
        return jax.value_and_grad(loss, has_aux=True)(p)

    sigmas = jnp.array([0.01, 50.0])
    (value, logits), grads = loss_and_grad(params, sigmas)
    assert logits.shape == (2, 10)
    assert np.isfinite(float(value)) and bool(jnp.all(jnp.isfinite(logits)))
    fourier = grads["WideResnet"]["GaussianFourierProjection_0"]["W"]
    assert fourier.shape == (128,) and float(jnp.max(jnp.abs(fourier))) == 0.0
    assert float(jnp.sum(jnp.abs(grads["WideResnet"]["init_conv"]["kernel"]))) > 0
    # The noise level matters: swapping the sigmas changes the logits.
    (_, swapped), _ = loss_and_grad(params, sigmas[::-1])
    assert float(jnp.max(jnp.abs(swapped - logits))) > 1e-5


def test_unknown_model_name_lists_ours():
    with pytest.raises(ValueError, match="ncsnv2_64"):
        get_model("ncsnv3")
