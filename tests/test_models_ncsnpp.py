"""Tests of the NCSN++ / DDPM++ / DDPM networks and their layers.

Big models are only traced (jax.eval_shape, no allocation); numerics run on tiny widths.
"""

from __future__ import annotations

import importlib

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from models import layers, layerspp, utils
from models import up_or_down_sampling as uds

K1331 = (1, 3, 3, 1)
# 'rbg' keys compile much faster than threefry on CPU; used where only shapes or exact
# relations between two calls with the same parameters matter.
_KEY = jax.random.key(0, impl="rbg")


def _config(name: str):
    return importlib.import_module("configs." + name.replace("/", ".")).get_config()


def _np_conv2d_same(x, w):
    """Naive 'SAME' cross-correlation, x [N,H,W,Ci], w [k,k,Ci,Co] (odd k)."""
    k = w.shape[0]
    r = k // 2
    xp = np.pad(x, ((0, 0), (r, r), (r, r), (0, 0)))
    out = np.zeros(x.shape[:3] + (w.shape[-1],), np.float64)
    for a in range(k):
        for b in range(k):
            out += np.einsum("nhwc,cd->nhwd", xp[:, a:a + x.shape[1], b:b + x.shape[2]], w[a, b])
    return out


def _np_upfirdn2d(x, k, up, down, pad):
    """Direct transcription of the definition, one output pixel at a time (float64)."""
    n, h, w, c = x.shape
    z = np.zeros((n, h * up, w * up, c))
    z[:, ::up, ::up] = x  # zero insertion: each pixel followed by up - 1 zeros
    p0, p1 = pad
    z = np.pad(z, ((0, 0), (max(p0, 0), max(p1, 0)), (max(p0, 0), max(p1, 0)), (0, 0)))
    z = z[:, max(-p0, 0):z.shape[1] - max(-p1, 0), max(-p0, 0):z.shape[2] - max(-p1, 0)]
    kh, kw = k.shape
    oh, ow = z.shape[1] - kh + 1, z.shape[2] - kw + 1
    out = np.zeros((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            # true convolution: out[i] = sum_a z[i + a] k[kh - 1 - a]
            patch = z[:, i:i + kh, j:j + kw, :]
            out[:, i, j, :] = np.einsum("nabc,ab->nc", patch, k[::-1, ::-1])
    return out[:, ::down, ::down]


# ----------------------------------------------------------------------------------------
# Parameter counts of the reference implementation (yang-song/score_sde), traced only.
# ----------------------------------------------------------------------------------------

PARAM_COUNTS = {
    "ve/cifar10_ncsnpp_continuous": 62_758_915,
    "ve/cifar10_ncsnpp": 62_693_251,
    "vp/cifar10_ncsnpp_continuous": 62_693_251,
    "subvp/cifar10_ncsnpp_continuous": 62_693_251,
    "vp/cifar10_ddpmpp": 61_804_419,
    "vp/cifar10_ddpmpp_continuous": 61_804_419,
    "subvp/cifar10_ddpmpp_continuous": 61_804_419,
    "ve/cifar10_ncsnpp_deep_continuous": 107_587_075,
    "vp/cifar10_ddpmpp_deep_continuous": 106_632_579,
    "subvp/cifar10_ddpmpp_deep_continuous": 106_632_579,
    "vp/ddpm/cifar10": 35_218_947,
    "ve/celebahq_256_ncsnpp_continuous": 65_574_549,
    "ve/ffhq_ncsnpp_continuous": 105_785_896,
}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_parameter_count(name):
    assert utils.count_params(utils.param_shapes(_config(name))) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", ["ve/cifar10_ncsnpp_deep_continuous", "vp/cifar10_ddpmpp",
                                  "vp/ddpm/cifar10", "ve/celebahq_256_ncsnpp_continuous",
                                  "ve/ffhq_ncsnpp_continuous"])
def test_full_size_output_shape(name):
    # The full-size network maps x to an array of x's shape (traced, nothing allocated).
    config = _config(name)
    model = utils.create_model(config)
    shape = (2, config.data.image_size, config.data.image_size, config.data.num_channels)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    t = jax.ShapeDtypeStruct((2,), jnp.float32)
    out, variables = jax.eval_shape(
        lambda x, t: model.init_with_output(jax.random.PRNGKey(0), x, t, train=False), x, t)
    assert out.shape == shape and out.dtype == jnp.float32
    assert set(variables) == {"params"}


def test_fourier_weights_counted_in_params():
    params = utils.param_shapes(_config("ve/cifar10_ncsnpp_continuous"))
    assert params["GaussianFourierProjection_0"]["W"].shape == (128,)


# ----------------------------------------------------------------------------------------
# FIR resampling.
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("up,down,pad,k", [
    (1, 1, (1, 2), np.arange(1.0, 10.0).reshape(3, 3)),   # asymmetric: checks the flip
    (2, 1, (2, 1), np.outer(K1331, K1331) / 64.0 * 4),
    (1, 2, (1, 1), np.outer(K1331, K1331) / 64.0),
    (3, 2, (-1, 2), np.arange(1.0, 17.0).reshape(4, 4)),  # negative pad crops
])
def test_upfirdn2d_matches_direct_definition(up, down, pad, k):
    x = np.random.default_rng(0).normal(size=(2, 7, 6, 3))
    want = _np_upfirdn2d(x, np.asarray(k, np.float64), up, down, pad)
    xj = jnp.asarray(x, jnp.float32)
    # A constant filter (shifted-view sums) and a traced one (depthwise convolution).
    got = uds.upfirdn2d(xj, k, up=up, down=down, pad=pad)
    traced = jax.jit(lambda x, k: uds.upfirdn2d(x, k, up=up, down=down, pad=pad))(xj, k)
    for out in (got, traced):
        assert out.shape == want.shape
        np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_fir_kernel_normalization():
    k = uds.setup_kernel(K1331)
    np.testing.assert_allclose(k, np.outer(K1331, K1331) / 64.0)
    assert k.sum() == pytest.approx(1.0)


def test_upsample_downsample_preserve_constants_and_match_box_filter():
    c = jnp.full((1, 12, 12, 2), 3.0)
    up = np.asarray(uds.upsample_2d(c, K1331))
    down = np.asarray(uds.downsample_2d(c, K1331))
    assert up.shape == (1, 24, 24, 2) and down.shape == (1, 6, 6, 2)
    # Zero padding only reaches the outermost output pixel.
    np.testing.assert_allclose(up[:, 1:-1, 1:-1], 3.0, rtol=1e-6)
    np.testing.assert_allclose(down[:, 1:-1, 1:-1], 3.0, rtol=1e-6)
    # Default kernels: nearest-neighbour upsampling and 2x2 box averaging, exactly.
    x = np.random.default_rng(1).normal(size=(2, 6, 8, 3)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(uds.upsample_2d(x)), x.repeat(2, 1).repeat(2, 2),
                               rtol=1e-6)
    box = x.reshape(2, 3, 2, 4, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(np.asarray(uds.downsample_2d(x)), box, rtol=1e-5, atol=1e-6)


def test_down_of_up_is_the_polyphase_filter():
    # Up by 2 with 2k then down by 2 with k filters x by the even polyphase part of the
    # composite g = (2k) * k: with k = [1,3,3,1]/8, g = [1,6,15,20,15,6,1]/32 and the
    # zero-phase component is [6, 20, 6]/32 = [3, 10, 3]/16 per axis.
    x = np.random.default_rng(2).normal(size=(1, 10, 10, 2))
    y = np.asarray(uds.downsample_2d(uds.upsample_2d(jnp.asarray(x, jnp.float32), K1331),
                                     K1331))
    h = np.array([3.0, 10.0, 3.0]) / 16.0
    want = _np_conv2d_same(x, np.outer(h, h)[:, :, None, None] * np.eye(2)[None, None])
    # The borders differ because each op zero-pads its own input.
    np.testing.assert_allclose(y[:, 1:-1, 1:-1], want[:, 1:-1, 1:-1], rtol=1e-5, atol=1e-5)


def _conv_same(x, w):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


def test_fused_upsample_conv_equals_unfused():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 5)), jnp.float32)
    fused = np.asarray(uds.upsample_conv_2d(x, w, K1331))
    unfused = np.asarray(_conv_same(uds.upsample_2d(x, K1331), w))
    assert fused.shape == unfused.shape == (2, 16, 16, 5)
    np.testing.assert_allclose(fused[:, 1:-1, 1:-1], unfused[:, 1:-1, 1:-1], rtol=1e-4,
                               atol=1e-4)
    # Everywhere, the fused op equals the composition on an unbounded canvas: pad x with
    # zeros, compose, crop back.
    m = 2
    xp = jnp.pad(x, ((0, 0), (m, m), (m, m), (0, 0)))
    big = np.asarray(_conv_same(uds.upsample_2d(xp, K1331), w))
    np.testing.assert_allclose(fused, big[:, 2 * m:-2 * m, 2 * m:-2 * m], rtol=1e-4,
                               atol=1e-4)


def test_fused_conv_downsample_equals_unfused():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 12, 12, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, 4)), jnp.float32)
    fused = np.asarray(uds.conv_downsample_2d(x, w, K1331))
    unfused = np.asarray(uds.downsample_2d(_conv_same(x, w), K1331))
    assert fused.shape == unfused.shape == (2, 6, 6, 4)
    np.testing.assert_allclose(fused[:, 1:-1, 1:-1], unfused[:, 1:-1, 1:-1], rtol=1e-4,
                               atol=1e-4)
    m = 2
    xp = jnp.pad(x, ((0, 0), (m, m), (m, m), (0, 0)))
    big = np.asarray(uds.downsample_2d(_conv_same(xp, w), K1331))
    np.testing.assert_allclose(fused, big[:, m // 2:-(m // 2), m // 2:-(m // 2)], rtol=1e-4,
                               atol=1e-4)


def test_conv2d_module_shapes_and_params():
    x = jnp.ones((1, 8, 8, 3))
    for kwargs, size in [({}, 8), ({"up": True}, 16), ({"down": True}, 4)]:
        mod = uds.Conv2d(fmaps=5, kernel=3, **kwargs)
        variables = mod.init(_KEY, x)
        assert variables["params"]["kernel"].shape == (3, 3, 3, 5)
        assert variables["params"]["bias"].shape == (5,)
        assert mod.apply(variables, x).shape == (1, size, size, 5)


# ----------------------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------------------


def test_default_init_bounds():
    # variance_scaling(scale, fan_avg, uniform) draws from U(-a, a), a = sqrt(3 scale / fan_avg).
    shape = (3, 3, 16, 32)
    fan_avg = (9 * 16 + 9 * 32) / 2
    for scale, bound in [(1.0, np.sqrt(3 / fan_avg)), (0.0, np.sqrt(3e-10 / fan_avg))]:
        w = np.asarray(layers.default_init(scale)(jax.random.PRNGKey(0), shape))
        assert np.abs(w).max() <= bound
        assert np.abs(w).max() > 0.9 * bound  # 4608 draws fill the range


def test_timestep_embedding_closed_form():
    t = jnp.array([0.0, 1.0, 250.5])
    emb = np.asarray(layers.get_timestep_embedding(t, 8))
    freqs = 10000.0 ** (-np.arange(4) / 3)
    want = np.concatenate([np.sin(np.outer(t, freqs)), np.cos(np.outer(t, freqs))], axis=1)
    np.testing.assert_allclose(emb, want, rtol=1e-5, atol=1e-5)
    assert layers.get_timestep_embedding(t, 7).shape == (3, 7)


@pytest.mark.parametrize("block", ["biggan", "ddpm", "attn"])
def test_skip_rescale_divides_residual_sum_by_sqrt2(block):
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 16))
    temb = jax.random.normal(jax.random.PRNGKey(1), (2, 32))

    def make(skip_rescale):
        # init_scale = 1 so that the residual branch is not (almost) zero.
        if block == "biggan":
            return layerspp.ResnetBlockBigGANpp(act=jax.nn.swish, skip_rescale=skip_rescale,
                                                init_scale=1.0, dropout=0.0)
        if block == "ddpm":
            return layerspp.ResnetBlockDDPMpp(act=jax.nn.swish, skip_rescale=skip_rescale,
                                              init_scale=1.0, dropout=0.0)
        return layerspp.AttnBlockpp(skip_rescale=skip_rescale, init_scale=1.0)

    args = (x,) if block == "attn" else (x, temb, False)
    params = make(False).init(_KEY, *args)
    plain = np.asarray(make(False).apply(params, *args))
    rescaled = np.asarray(make(True).apply(params, *args))
    branch = plain - np.asarray(x)
    assert np.abs(branch).mean() > 0.01  # the residual branch contributes
    np.testing.assert_allclose(rescaled, plain / np.sqrt(2.0), rtol=1e-5, atol=1e-6)


def test_resnet_block_resampling_shapes():
    x = jnp.ones((1, 8, 8, 8))
    for kwargs, size in [({"up": True}, 16), ({"down": True}, 4)]:
        for fir in (True, False):
            blk = layerspp.ResnetBlockBigGANpp(act=jax.nn.swish, out_ch=12, fir=fir, **kwargs)
            out = jax.eval_shape(lambda b=blk: b.init_with_output(jax.random.PRNGKey(0), x)[0])
            assert out.shape == (1, size, size, 12)


# ----------------------------------------------------------------------------------------
# Tiny NCSN++: zero output at init, fixed Fourier features.
# ----------------------------------------------------------------------------------------


def _shrink(config, **overrides):
    """Tiny width, one block per level, and only as many levels as keep the bottleneck
    (where attention always runs) at <= 32 px: compiles fast, keeps the configured resolution
    and every branch of the architecture."""
    m = config.model
    m.num_res_blocks = 1
    levels = max(2, int(np.log2(config.data.image_size // 32)) + 1)
    m.ch_mult = tuple(m.ch_mult)[:levels]
    for key, value in overrides.items():
        m[key] = value
    return config


def _tiny_ncsnpp_config():
    # NCSN++ VE continuous at 32 px: Fourier features, FIR, BigGAN blocks, residual input
    # pyramid, attention at 16 px.
    return _shrink(_config("ve/cifar10_ncsnpp_continuous"), nf=8, dropout=0.0)


@pytest.fixture(scope="module")
def tiny_ncsnpp():
    config = _tiny_ncsnpp_config()
    model = utils.create_model(config)
    # The 'rbg' PRNG compiles far faster than threefry on CPU; the initializers (and so the
    # distributions tested here) are the same.
    init = jax.jit(lambda key: model.init({"params": key}, jnp.zeros((1, 32, 32, 3)),
                                          jnp.ones((1,)), train=False))
    variables = init(jax.random.key(0, impl="rbg"))
    params = variables["params"]
    x = jax.random.uniform(jax.random.PRNGKey(1), (2, 32, 32, 3))
    sigmas = jnp.array([0.05, 3.0])
    z = jax.random.normal(jax.random.PRNGKey(2), x.shape)

    def loss_fn(params):
        # Denoising score matching at two noise levels (the continuous VE objective).
        score = model.apply({"params": params}, x + sigmas[:, None, None, None] * z, sigmas,
                            train=False)
        return jnp.mean((score * sigmas[:, None, None, None] + z) ** 2), score

    (loss, score), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return dict(config=config, model=model, variables=variables, params=params, loss=loss,
                score=score, grads=grads)


def test_forward_backward_ve_ncsnpp_continuous(tiny_ncsnpp):
    assert tiny_ncsnpp["score"].shape == (2, 32, 32, 3)
    assert np.isfinite(float(tiny_ncsnpp["loss"]))
    assert all(np.all(np.isfinite(np.asarray(g)))
               for g in jax.tree_util.tree_leaves(tiny_ncsnpp["grads"]))


def test_init_scale_zero_gives_near_zero_output(tiny_ncsnpp):
    score = np.asarray(tiny_ncsnpp["score"])
    assert set(tiny_ncsnpp["variables"]) == {"params"}  # no batch statistics or buffers
    assert np.all(np.isfinite(score))
    # Output conv kernels ~ U(+-1e-5 sqrt(3 / fan)): the network output is ~1e-5, not O(1).
    assert np.abs(score).max() < 1e-3
    # ...and is not identically zero (the init did not degenerate).
    assert np.abs(score).max() > 0


def test_fourier_weights_fixed_under_adam(tiny_ncsnpp):
    params, grads = tiny_ncsnpp["params"], tiny_ncsnpp["grads"]
    fourier = "GaussianFourierProjection_0"
    old_w = np.asarray(params[fourier]["W"])
    flat_grads = flax.traverse_util.flatten_dict(grads)
    # stop_gradient: W's gradient is exactly zero, every other leaf gets a gradient.
    assert np.all(np.asarray(flat_grads[(fourier, "W")]) == 0)
    assert all(np.any(np.asarray(g) != 0) for p, g in flat_grads.items() if p != (fourier, "W"))

    opt = optax.adam(1e-3)

    @jax.jit
    def step(params, grads):
        updates, _ = opt.update(grads, opt.init(params), params)
        return optax.apply_updates(params, updates)

    new = step(params, grads)
    assert np.array_equal(np.asarray(new[fourier]["W"]), old_w)
    # The layer fed by the Fourier features, the input conv and the output conv do move.
    output_conv = f"Conv_{max(int(k.split('_')[1]) for k in params if k.startswith('Conv_'))}"
    for name in ("Dense_0", "Conv_0", output_conv):
        assert not np.array_equal(np.asarray(new[name]["kernel"]),
                                  np.asarray(params[name]["kernel"])), name

    # With weight decay a zero gradient is not enough; trainable_mask freezes W provably.
    # (Adam is per-leaf, so a sub-tree shows the behaviour of the whole tree.)
    mask = layerspp.trainable_mask(params)
    assert mask[fourier]["W"] is False
    assert sum(not m for m in jax.tree_util.tree_leaves(mask)) == 1
    sub = lambda tree: {k: tree[k] for k in (fourier, "Dense_0")}
    decayed = optax.adamw(1e-3, weight_decay=0.1)
    upd, _ = decayed.update(sub(grads), decayed.init(sub(params)), sub(params))
    assert not np.array_equal(np.asarray(optax.apply_updates(sub(params), upd)[fourier]["W"]),
                              old_w)
    frozen = optax.multi_transform({True: decayed, False: optax.set_to_zero()}, sub(mask))
    upd, _ = frozen.update(sub(grads), frozen.init(sub(params)), sub(params))
    new_sub = optax.apply_updates(sub(params), upd)
    assert np.array_equal(np.asarray(new_sub[fourier]["W"]), old_w)
    assert not np.array_equal(np.asarray(new_sub["Dense_0"]["kernel"]),
                              np.asarray(params["Dense_0"]["kernel"]))


# ----------------------------------------------------------------------------------------
# Forward + backward of every registered model of this file's scope, at the configured
# resolution, tiny width (random parameters: only shapes and finiteness matter here; the
# full-width, full-depth networks are traced in test_parameter_count_and_output_shape).
# ----------------------------------------------------------------------------------------

FWD_BWD = {
    # (NCSN++ VE continuous runs in the tiny_ncsnpp fixture.)
    # NCSN++ VE discrete (positional embedding of VE indices, scale_by_sigma), switched to the
    # remaining branches: DDPM blocks with fused FIR up-conv / conv-down, residual output
    # pyramid, input_skip pyramid merged by concatenation.
    "ve/cifar10_ncsnpp": dict(nf=8, resblock_type="ddpm", progressive="residual",
                              progressive_input="input_skip", progressive_combine="cat"),
    # DDPM++: no FIR, no pyramids.
    "vp/cifar10_ddpmpp": dict(nf=8),
    # DDPM; GroupNorm(32) needs >= 32 channels.
    "vp/ddpm/cifar10": dict(nf=32),
    # 256 px: output_skip / input_skip pyramids, sum combine.
    "ve/celebahq_256_ncsnpp_continuous": dict(nf=4),
}


def _labels(config, batch):
    m = config.model
    if m.name == "ncsnpp" and m.embedding_type == "fourier":
        return jnp.linspace(m.sigma_min, m.sigma_max, batch)  # noise levels
    if m.scale_by_sigma:
        return jnp.arange(batch, dtype=jnp.float32) * 7  # VE discrete indices
    return jnp.linspace(0.0, 999.0, batch)  # VP timesteps


@pytest.mark.parametrize("name", sorted(FWD_BWD))
def test_forward_backward_tiny(name):
    config = _shrink(_config(name), **FWD_BWD[name])
    size, channels = config.data.image_size, config.data.num_channels
    model = utils.create_model(config)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(
        lambda s: jnp.asarray(rng.normal(scale=0.1, size=s.shape), jnp.float32),
        utils.param_shapes(config))
    x = jnp.asarray(rng.uniform(size=(2, size, size, channels)), jnp.float32)
    t = _labels(config, 2)

    def loss_fn(params, x):
        out = model.apply({"params": params}, x, t, train=True,
                          rngs={"dropout": jax.random.PRNGKey(0)})
        return jnp.mean(out ** 2), out

    (loss, out), (gp, gx) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1),
                                                       has_aux=True))(params, x)
    assert out.shape == x.shape
    assert np.all(np.isfinite(np.asarray(out))) and np.isfinite(float(loss))
    assert gx.shape == x.shape and np.all(np.isfinite(np.asarray(gx)))
    assert np.abs(np.asarray(gx)).max() > 0
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(gp))


def test_bad_option_lists_valid_choices():
    config = _tiny_ncsnpp_config()
    config.model.progressive = "sideways"
    model = utils.create_model(config)
    with pytest.raises(ValueError, match="output_skip"):
        jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                          jnp.ones((1,)), train=False))
