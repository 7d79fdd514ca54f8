"""Performance features: compute precision, the persistent compilation cache, rematerialization
and the XLA:CPU backend's gradient formulations (backend/cpu.py), each checked against the plain
float32 computation of the plain networks (models/)."""

import contextlib
import glob
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import backend
import losses
import sde_lib
from backend import cpu
from configs import tiny_test
from models import layers, precision
from models import utils as mutils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DN = ("NHWC", "HWIO", "NHWC")


def _bf16_round(x):
    return np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))


def test_bfloat16_products_round_operands_and_accumulate_in_float32():
    rng = np.random.RandomState(0)
    x = rng.randn(2, 6, 6, 5).astype(np.float32)
    w = rng.randn(3, 3, 5, 4).astype(np.float32)
    a, b = rng.randn(7, 5).astype(np.float32), rng.randn(5, 3).astype(np.float32)
    conv = precision.conv_fn("bfloat16")(x, w, (1, 1), "SAME", dimension_numbers=DN)
    dot = precision.dot_fn("bfloat16")(a, b, (((1,), (0,)), ((), ())))
    ein = precision.einsum("ij,jk->ik", a, b, "bfloat16")
    assert conv.dtype == dot.dtype == ein.dtype == jnp.float32
    # Exactly the float32 products of the bf16-rounded operands (bf16 x bf16 is exact in f32).
    want_conv = lax.conv_general_dilated(_bf16_round(x), _bf16_round(w), (1, 1), "SAME",
                                         dimension_numbers=DN,
                                         precision=lax.Precision.HIGHEST)
    want_dot = _bf16_round(a).astype(np.float64) @ _bf16_round(b).astype(np.float64)
    np.testing.assert_allclose(conv, want_conv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dot, want_dot, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ein, want_dot, rtol=1e-5, atol=1e-5)
    # ... and not the float32 products of the unrounded ones.
    assert np.max(np.abs(np.asarray(dot) - a.astype(np.float64) @ b)) > 1e-3


def test_float32_precision_is_the_plain_computation():
    assert precision.conv_fn("float32") is lax.conv_general_dilated
    assert precision.dot_fn("float32") is lax.dot_general


@pytest.mark.parametrize("bad", ["float16", "bf16", "fp32", ""])
def test_unknown_precision_names_the_choices(bad):
    with pytest.raises(ValueError, match=r"bfloat16.*float32"):
        precision.check_precision(bad)


def test_bfloat16_gradients_flow_in_float32():
    w = jnp.ones((3, 3, 2, 2))
    x = jnp.linspace(-1, 1, 2 * 4 * 4 * 2).reshape(2, 4, 4, 2)
    conv = precision.conv_fn("bfloat16")
    g = jax.grad(lambda w: jnp.sum(conv(x, w, (1, 1), "SAME", dimension_numbers=DN) ** 2))(w)
    assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))

# ---------------------------------------------------------------------------------------
# Persistent compilation cache

_CACHE_CHILD = r"""
import importlib.util, os, sys, jax, jax.numpy as jnp
# run_lib/runtime.py alone (run_lib/__init__ would import TensorFlow, seconds per process).
spec = importlib.util.spec_from_file_location("runtime", os.path.join("run_lib", "runtime.py"))
runtime = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runtime)
HIT = "/jax/compilation_cache/cache_hits"
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event == HIT))
used = runtime.setup_compile_cache(sys.argv[1], min_compile_time_secs=0.0)
from configs import tiny_test
from models import utils as mutils
config = tiny_test.get_config()
model = mutils.create_model(config)
params = jax.tree_util.tree_map(lambda s: jnp.full(s.shape, 0.01, s.dtype),
                                mutils.param_shapes(config))
x = jnp.zeros((2, 28, 28, 1)); t = jnp.ones((2,))
jax.block_until_ready(jax.jit(lambda p: model.apply({"params": p}, x, t, train=False))(params))
print("RESULT", used, sum(hits), len(os.listdir(used)))
"""


def _cache_child(cache_dir):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run([sys.executable, "-c", _CACHE_CHILD, cache_dir], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT")][-1].split()
    return line[1], int(line[2]), int(line[3])


def test_a_second_process_loads_its_programs_from_the_compile_cache(tmp_path):
    cache = str(tmp_path / "xla")
    used, hits, entries = _cache_child(cache)
    assert used == cache and hits == 0 and entries > 0
    used, hits2, entries2 = _cache_child(cache)
    # Every program of the second process came from the cache: hits, and nothing new written.
    assert hits2 >= entries and entries2 == entries


# ---------------------------------------------------------------------------------------
# The network's gradient against plain autodiff; bf16; remat


def _small_ncsnpp():
    """A small NCSN++ with FIR resampling, attention, dropout and the residual input pyramid."""
    config = tiny_test.get_config()
    config.data.image_size = 8
    config.training.batch_size = 16
    config.model.update(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
                        dropout=0.1, fir=True, progressive_input="residual")
    return config


CONFIGS = {"tiny": tiny_test.get_config, "small_fir_attention": _small_ncsnpp}
# Tests compare programs, not their speed: XLA's cheap optimization level compiles in a
# fraction of the time. The memory-optimized scheduler is what run_lib uses on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
_RESULTS, _TEMP_BYTES = {}, {}


def _init(config):
    """(model, states, params) as init_model gives them, compiled cheaply."""
    model = mutils.create_model(config)
    size, ch = config.data.image_size, config.data.num_channels
    x, t = jnp.zeros((1, size, size, ch)), jnp.ones((1,))
    init = jax.jit(lambda key: model.init(key, x, t, train=False))
    key = jax.random.PRNGKey(0)
    variables = dict(init.lower(key).compile(FAST_COMPILE)(key))
    params = variables.pop("params")
    return model, variables, params


def _loss_and_grad(name, precision="float32", remat=False, plain=False):
    """The continuous VE training loss of the network of CONFIGS[name] and its gradient
    (with `plain`, the plain networks alone: plain autodiff's gradient; otherwise traced with
    the CPU backend's formulations, as the build layer does on CPU)."""
    key = (name, precision, remat, plain)
    if key in _RESULTS:
        return _RESULTS[key]
    config = CONFIGS[name]()
    config.training.precision, config.training.remat = precision, remat
    model, states, params = _init(config)
    sde = sde_lib.get_sde(config)
    loss_fn = losses.get_loss_fn(sde, model, train=True, reduce_mean=False, continuous=True)
    size, ch = config.data.image_size, config.data.num_channels
    batch = jax.random.uniform(jax.random.PRNGKey(1), (config.training.batch_size, size, size,
                                                       ch))
    fn = jax.value_and_grad(lambda p: loss_fn(jax.random.PRNGKey(2), p, states, batch)[0])
    with contextlib.nullcontext() if plain else cpu.formulations():
        compiled = jax.jit(fn).lower(params).compile(FAST_COMPILE)
    _RESULTS[key] = compiled(params)
    _TEMP_BYTES[key] = compiled.memory_analysis().temp_size_in_bytes
    return _RESULTS[key]


def _relative_error(a, b):
    """||a - b|| / ||a|| over a whole pytree."""
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    diff = sum(float(jnp.sum((x - y) ** 2)) for x, y in pairs)
    norm = sum(float(jnp.sum(x ** 2)) for x in jax.tree_util.tree_leaves(a))
    return (diff / norm) ** 0.5


def _plain_channel_dense(x, w, b, precision="float32"):
    return jnp.einsum("...c,cd->...d", x, w) + b


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_float32_gradient_equals_plain_autodiff(name):
    loss, grad = _loss_and_grad(name)
    plain_loss, plain_grad = _loss_and_grad(name, plain=True)
    assert float(loss) == pytest.approx(float(plain_loss), rel=1e-6)
    assert _relative_error(plain_grad, grad) < 1e-5
    # The comparison is not vacuous: the attention projections have gradients.
    flat = jax.tree_util.tree_leaves_with_path(grad)
    nin = [v for path, v in flat if "NIN" in jax.tree_util.keystr(path)]
    assert nin and all(float(jnp.max(jnp.abs(v))) > 0 for v in nin)


def test_bfloat16_matches_float32_on_the_tiny_config():
    loss32, grad32 = _loss_and_grad("tiny")
    loss16, grad16 = _loss_and_grad("tiny", precision="bfloat16")
    assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grad16))
    # bf16 operands carry 8 significant bits (relative rounding 2^-9, 0.2%); the stated
    # tolerance: 1% on the loss, 5% on the gradient as a whole.
    assert float(loss16) == pytest.approx(float(loss32), rel=1e-2)
    assert 1e-5 < _relative_error(grad32, grad16) < 5e-2  # bf16 is in use, yet close


def test_remat_same_gradient_less_memory():
    loss, grad = _loss_and_grad("small_fir_attention")
    remat_loss, remat_grad = _loss_and_grad("small_fir_attention", remat=True)
    assert float(remat_loss) == pytest.approx(float(loss), rel=1e-6)
    assert _relative_error(grad, remat_grad) < 1e-5

    # What it trades: XLA's temporary buffers of the same program, with and without remat.
    temp, remat_temp = (_TEMP_BYTES[("small_fir_attention", "float32", r, False)]
                        for r in (False, True))
    assert remat_temp < 0.95 * temp  # measured: 15% less (3.33 vs 3.92 MB)


def test_unsupported_run_settings_are_refused():
    config = tiny_test.get_config()
    config.training.precision = "float16"
    with pytest.raises(ValueError, match="float16"):
        mutils.init_model(jax.random.PRNGKey(0), config)
    from configs.vp.ddpm import cifar10 as ddpm_cifar10

    config = ddpm_cifar10.get_config()
    config.training.precision = "bfloat16"
    with pytest.raises(ValueError, match=r"precision='bfloat16'.*'ncsnpp'"):
        mutils.create_model(config)


def test_no_random_bits_without_dropout():
    config = tiny_test.get_config()
    x, t = jnp.zeros((2, 28, 28, 1)), jnp.ones((2,))

    def jaxpr(dropout):
        config.model.dropout = dropout
        model, params = mutils.create_model(config), mutils.param_shapes(config)
        return str(jax.make_jaxpr(lambda p: model.apply(
            {"params": p}, x, t, train=True, rngs={"dropout": jax.random.PRNGKey(0)}))(params))

    assert "random_bits" not in jaxpr(0.0) and "threefry" not in jaxpr(0.0)
    assert "random_bits" in jaxpr(0.1) or "threefry" in jaxpr(0.1)


def test_channel_dense_forward_mode_equals_plain():
    """The likelihood's divergence (and any jax.jvp through a network) uses forward mode."""
    kx, kw, kt = jax.random.split(jax.random.PRNGKey(3), 3)
    x = jax.random.normal(kx, (2, 4, 4, 6))
    w, b = jax.random.normal(kw, (6, 5)), jnp.arange(5.0)
    tangent = jax.random.normal(kt, x.shape)
    out, jvp = jax.jvp(lambda v: cpu.channel_dense(v, w, b), (x,), (tangent,))
    plain_out, plain_jvp = jax.jvp(lambda v: _plain_channel_dense(v, w, b), (x,), (tangent,))
    np.testing.assert_allclose(out, plain_out, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(jvp, plain_jvp, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kernel", [1, 3])
def test_conv_forward_and_reverse_mode_equal_plain(kernel):
    """The CPU backend's convolution (1x1 as a channel product, 3x3 with a cotangent barrier) in
    forward and reverse mode against lax.conv_general_dilated."""
    kx, kw, kt, kg = jax.random.split(jax.random.PRNGKey(4), 4)
    x = jax.random.normal(kx, (2, 5, 5, 6))
    w = jax.random.normal(kw, (kernel, kernel, 6, 4))
    tangent, g = jax.random.normal(kt, x.shape), jax.random.normal(kg, (2, 5, 5, 4))
    dn = lax.conv_dimension_numbers(x.shape, w.shape, DN)
    fast = cpu.conv_fn("float32")

    def conv(fn):
        return lambda x, w: fn(x, w, (1, 1), "SAME", dimension_numbers=dn)

    out, jvp = jax.jvp(lambda v: conv(fast)(v, w), (x,), (tangent,))
    plain_out, plain_jvp = jax.jvp(lambda v: conv(lax.conv_general_dilated)(v, w), (x,),
                                   (tangent,))
    np.testing.assert_allclose(out, plain_out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jvp, plain_jvp, rtol=1e-5, atol=1e-5)
    grads = jax.vjp(conv(fast), x, w)[1](g)
    plain_grads = jax.vjp(conv(lax.conv_general_dilated), x, w)[1](g)
    for a, b in zip(grads, plain_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cotangent_barrier_is_the_identity_in_both_modes_and_materializes_on_cpu():
    """The residual sums' barrier: value, tangent and cotangent pass unchanged (also for a
    first element that is NaN, the other branch), and on CPU the gradient program carries the
    conditional that keeps XLA from fusing the cotangent into its consumers."""
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 4, 4, 3))
    t = jax.random.normal(jax.random.PRNGKey(7), x.shape)

    def f(v):
        return jnp.sin(cpu.cotangent_barrier(v * 2.0))

    for v in (x, x.at[0, 0, 0, 0].set(jnp.nan)):
        out, jvp = jax.jit(lambda v: jax.jvp(f, (v,), (t,)))(v)
        np.testing.assert_array_equal(out, jnp.sin(v * 2.0))
        np.testing.assert_allclose(jvp, jnp.cos(v * 2.0) * 2.0 * t, rtol=1e-6)
        grad = jax.jit(jax.grad(lambda v: jnp.nansum(f(v) * t)))(v)
        np.testing.assert_allclose(grad, jnp.cos(v * 2.0) * 2.0 * t, rtol=1e-6)
    hlo = jax.jit(jax.grad(lambda v: jnp.sum(f(v) * t))).lower(x).as_text()
    assert ("stablehlo.case" in hlo) == (jax.default_backend() == "cpu")
    plain = jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(v * 2.0) * t))).lower(x).as_text()
    assert "stablehlo.case" not in plain


def test_residual_sum_is_plain_unless_the_cpu_backend_is_on():
    """layers.ResidualSum: x + h (over sqrt 2); the CPU formulations add the barrier's
    conditional to its gradient, the plain module has none."""
    x, h = (jax.random.normal(jax.random.PRNGKey(k), (2, 4, 4, 3)) for k in (8, 9))
    module = layers.ResidualSum(skip_rescale=True)

    def grad_hlo():
        loss = lambda x: jnp.sum(jnp.sin(module.apply({}, x, h)))  # noqa: E731
        return jax.jit(jax.grad(loss)).lower(x).as_text()

    np.testing.assert_allclose(module.apply({}, x, h), (x + h) / np.sqrt(2.0), rtol=1e-6)
    assert "stablehlo.case" not in grad_hlo()
    with cpu.formulations():
        assert "stablehlo.case" in grad_hlo()
    assert "stablehlo.case" in jax.jit(jax.grad(backend.tuned(
        lambda x: jnp.sum(jnp.sin(module.apply({}, x, h)))))).lower(x).as_text()


def test_dropout_drops_the_rate_and_keeps_the_mean():
    x = jnp.ones((64, 32, 32, 16))
    for rate in (0.1, 0.5):
        y = np.asarray(cpu.dropout(x, rate, jax.random.PRNGKey(5)))
        dropped = float(np.mean(y == 0))
        # 1M draws: the standard error of the fraction is below 5e-4.
        assert abs(dropped - rate) < 3e-3
        assert abs(float(y.mean()) - 1.0) < 6e-3
        assert set(np.unique(y)) == {0.0, np.float32(65536 / (65536 - round(rate * 65536)))}
    a, b = (cpu.dropout(x, 0.1, jax.random.PRNGKey(k)) for k in (6, 7))
    assert not np.array_equal(a, b)


def _apply_dropout(rate, key):
    x = jnp.ones((64, 32, 32, 16))
    return np.asarray(layers.Dropout(rate).apply({}, x, deterministic=False,
                                                 rngs={"dropout": key}))


def test_plain_dropout_has_the_exact_rate_and_the_cpu_backend_its_16_bit_variant():
    for rate in (0.1, 0.5):
        y = _apply_dropout(rate, jax.random.PRNGKey(5))
        assert abs(float(np.mean(y == 0)) - rate) < 3e-3
        assert abs(float(y.mean()) - 1.0) < 6e-3
        # kept values are scaled by exactly 1 / (1 - rate), not by the 16-bit rounding's
        assert set(np.unique(y)) == {0.0, np.float32(1.0 / (1.0 - rate))}
    assert np.float32(1 / 0.9) != np.float32(65536 / (65536 - round(0.1 * 65536)))
    with cpu.formulations():
        y = _apply_dropout(0.1, jax.random.PRNGKey(5))
    # the CPU backend's variant, with the key the module draws
    key = jax.random.PRNGKey(5)
    want = layers.Dropout(0.1).apply(
        {}, jnp.ones((64, 32, 32, 16)), rngs={"dropout": key},
        method=lambda m, x: cpu.dropout(x, m.rate, m.make_rng("dropout")))
    np.testing.assert_array_equal(y, want)
    assert set(np.unique(y)) == {0.0, np.float32(65536 / (65536 - round(0.1 * 65536)))}


def _count_conds(remat):
    config = CONFIGS["small_fir_attention"]()
    config.training.remat = remat
    model = mutils.create_model(config)
    x, t = jnp.zeros((2, 8, 8, 1)), jnp.ones((2,))
    params = mutils.param_shapes(config)

    def loss(p):
        return jnp.sum(model.apply({"params": p}, x, t, train=True,
                                   rngs={"dropout": jax.random.PRNGKey(0)}))

    with cpu.formulations():
        text = str(jax.make_jaxpr(jax.grad(loss))(params))
    return len(re.findall(r"\bcond\[", text))


def test_rematerialized_blocks_keep_the_plain_formulations():
    """Inside nn.remat blocks the CPU backend leaves the plain modules alone (its buffers work
    against rematerialization); the layers outside the blocks still use its formulations."""
    plain_blocks, fast = _count_conds(remat=True), _count_conds(remat=False)
    assert 0 < plain_blocks < fast


def test_models_are_plain_flax_and_the_backend_is_chosen_by_the_build_layer():
    for path in glob.glob(os.path.join(ROOT, "models", "*.py")):
        text = open(path).read()
        assert not re.search(r"^\s*(from|import) (backend|run_lib)\b|fastgrad", text,
                             re.MULTILINE), path
    on_cpu = jax.default_backend() == "cpu"
    assert backend.on_cpu() == on_cpu
    assert backend.compiler_options() == (dict(cpu.COMPILER_OPTIONS) if on_cpu else None)
    assert backend.unroll_steps() == on_cpu
    f = lambda x: x  # noqa: E731
    assert (backend.tuned(f) is f) == (not on_cpu)


_REALLOCATE = r"""
import ctypes, importlib.util, resource, sys, threading
spec = importlib.util.spec_from_file_location("host", "backend/host.py")
host = importlib.util.module_from_spec(spec)
spec.loader.exec_module(host)
if sys.argv[1] == "reuse":
    assert host.reuse_freed_host_memory()
faults = []

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2**20

def step():  # a large block written and freed by a worker thread, as XLA's temporaries are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    libc.free(block)

for _ in range(3):
    worker = threading.Thread(target=step)
    worker.start()
    worker.join()
print(faults[-1])
"""


@pytest.mark.parametrize("mode", ["reuse", "default"])
def test_freed_host_memory_is_reused_by_the_next_step(mode):
    """With backend.host.reuse_freed_host_memory (run_lib.runtime's by name), a 64 MiB block
    allocated and freed by a worker thread is mapped once: the third allocation faults (almost)
    no page in; glibc's default unmaps it and faults all 16,384 pages in again."""
    out = subprocess.run([sys.executable, "-c", _REALLOCATE, mode], cwd=ROOT,
                         capture_output=True, text=True, check=True)
    faults = int(out.stdout.split()[-1])
    if mode == "reuse":
        assert faults < 1000, faults
    else:
        assert faults > 15000, faults
