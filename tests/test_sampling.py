"""Samplers against exact answers: with the exact score of Gaussian-mixture data, every sampler
must reproduce the data distribution within Monte-Carlo tolerance.

The data are 4-D: dims 0-1 a Gaussian N((1, -0.5), diag(0.5^2, 1)), independent of dims 2-3, a
well-separated 2-D mixture 0.2 N((-2, -2), 0.5^2 I) + 0.8 N((2, 2), 0.5^2 I). As a product of
the two it is a 2-component diagonal mixture, so one run checks both.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.extend
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from gaussian_utils import GaussianMixture

import sampling
import sde_lib

N_SAMPLES = 4000
N_STEPS = 500
DATA = GaussianMixture([0.2, 0.8], [[1.0, -0.5, -2.0, -2.0], [1.0, -0.5, 2.0, 2.0]],
                       [0.5, 1.0, 0.5, 0.5])
SHAPE = (N_SAMPLES, 4)
IDENTITY = lambda x: x

SDES = {
    "ve": lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=50.0, N=N_STEPS),
    "vp": lambda: sde_lib.VPSDE(beta_min=0.1, beta_max=20.0, N=N_STEPS),
    "subvp": lambda: sde_lib.subVPSDE(beta_min=0.1, beta_max=20.0, N=N_STEPS),
}


class BrownianSDE(sde_lib.SDE):
    """Test-only SDE dx = sigma dw: p_t(x | x0) = N(x0, sigma^2 t I), prior N(0, sigma^2 I)."""

    def __init__(self, sigma: float = 10.0, N: int = N_STEPS):
        super().__init__(N)
        self.sigma = sigma

    @property
    def T(self):
        return 1.0

    @property
    def sampling_eps(self):
        return 1e-5

    def sde(self, x, t):
        return jnp.zeros_like(x), jnp.full_like(t, self.sigma)

    def marginal_prob(self, x, t):
        return x, self.sigma * jnp.sqrt(t)

    def prior_sampling(self, rng, shape):
        return self.sigma * jax.random.normal(rng, shape)

    def prior_logp(self, z):
        flat = z.reshape(z.shape[0], -1)
        return jnp.sum(-0.5 * (flat / self.sigma) ** 2
                       - 0.5 * jnp.log(2 * jnp.pi * self.sigma**2), axis=-1)


def assert_matches_data(x, bias=0.01):
    """Weights, Gaussian-part means/stds and per-component means/stds within 4 standard
    errors plus `bias` times the data's std (discretization error of the sampler)."""
    x = np.asarray(x, np.float64)
    assert x.shape == SHAPE and np.all(np.isfinite(x))
    n = len(x)

    def close(value, target, se, scale, what):
        tol = 4 * se + bias * scale
        assert abs(value - target) < tol, f"{what}: {value:.4f} vs {target:.4f} (tol {tol:.4f})"

    upper = x[:, 2:].sum(1) > 0
    close(upper.mean(), 0.8, np.sqrt(0.16 / n), 1.0, "mixture weight")
    for d, (mu, s) in enumerate(zip((1.0, -0.5), (0.5, 1.0), strict=True)):
        close(x[:, d].mean(), mu, s / np.sqrt(n), s, f"gaussian mean[{d}]")
        close(x[:, d].std(), s, s / np.sqrt(2 * n), s, f"gaussian std[{d}]")
    for part, mu in ((x[upper][:, 2:], 2.0), (x[~upper][:, 2:], -2.0)):
        m = len(part)
        for d in range(2):
            close(part[:, d].mean(), mu, 0.5 / np.sqrt(m), 0.5, f"component {mu} mean[{d}]")
            close(part[:, d].std(), 0.5, 0.5 / np.sqrt(2 * m), 0.5, f"component {mu} std[{d}]")


def _pairs():
    for name in SDES:
        for p in ("euler_maruyama", "reverse_diffusion", "ancestral_sampling", "none"):
            for c in ("langevin", "ald", "none"):
                if (p, c) == ("none", "none"):
                    continue
                if p == "ancestral_sampling" and not SDES[name]().has_ancestral_update:
                    continue
                marks = ()
                if p == "none" and c == "ald" and name == "subvp":
                    # Annealed Langevin alone cannot follow the sub-VP mean m(t) mu as t -> 0: its
                    # step 2 alpha (r std_t)^2 with std_t = 1 - m(t)^2 ~ beta_0 t vanishes against
                    # the data variance, so the means lag by ~10 standard errors even with 10
                    # steps per level (NCSN's ALD is a VE sampler; VP's sqrt std just keeps up).
                    marks = pytest.mark.xfail(strict=True, reason="ALD-only lags sub-VP means")
                yield pytest.param(name, p, c, marks=marks, id=f"{name}-{p}-{c}")


@pytest.mark.parametrize("name,predictor,corrector", list(_pairs()))
def test_pc_sampler_reproduces_data(name, predictor, corrector):
    sde = SDES[name]()
    if predictor == "none":
        # Corrector-only sampling needs several MCMC steps per level to keep up with the
        # annealing; unadjusted Langevin also inflates variances by O(snr^2): allow 3%.
        n_steps, snr, bias = (10, 0.25, 0.03) if corrector == "ald" else (5, 0.16, 0.03)
    else:
        n_steps, snr, bias = 1, 0.16, 0.01
    sampler = sampling.get_pc_sampler(sde, SHAPE, predictor, corrector, IDENTITY, snr=snr,
                                      n_steps=n_steps, eps=sde.sampling_eps)
    x, nfe = sampler(jax.random.key(0), DATA.score_fn(sde))
    assert nfe == N_STEPS * (n_steps * (corrector != "none") + (predictor != "none"))
    assert_matches_data(x, bias)


@pytest.mark.parametrize("name", sorted(SDES))
@pytest.mark.parametrize("predictor", ["euler_maruyama", "reverse_diffusion"])
def test_probability_flow_predictor(name, predictor):
    sde = SDES[name]()
    sampler = sampling.get_pc_sampler(sde, SHAPE, predictor, "none", IDENTITY, snr=0.16,
                                      probability_flow=True, eps=sde.sampling_eps)
    assert_matches_data(sampler(jax.random.key(1), DATA.score_fn(sde))[0])


@pytest.mark.parametrize("name", sorted(SDES))
def test_ode_sampler_reproduces_data(name):
    sde = SDES[name]()
    sampler = sampling.get_ode_sampler(sde, SHAPE, IDENTITY, rtol=1e-4, atol=1e-4,
                                       eps=sde.sampling_eps)
    x, nfe = sampler(jax.random.key(2), DATA.score_fn(sde))
    assert_matches_data(x)
    assert 20 < int(nfe) < 2000


def assert_gaussian(x, mean, std, bias):
    """Per-dimension mean and std within 4 standard errors plus `bias` times the std."""
    x = np.asarray(x, np.float64)
    n = len(x)
    mean, std = np.asarray(mean), np.asarray(std)
    assert np.all(np.abs(x.mean(0) - mean) < 4 * std / np.sqrt(n) + bias * std), x.mean(0)
    assert np.all(np.abs(x.std(0) - std) < 4 * std / np.sqrt(2 * n) + bias * std), x.std(0)


def test_brownian_sde_runs_through_every_sampler():
    # sigma = 5 keeps the prior N(0, 25 I) close to p_T = N(mu, s^2 + 25) while N = 2000 keeps
    # the per-step variance sigma^2 / N small against the data's.
    sde = BrownianSDE(sigma=5.0, N=2000)
    assert not sde.has_ancestral_update
    data = GaussianMixture.gaussian([0.5, -0.5], [1.0, 0.5])
    score_fn = data.score_fn(sde)
    eps = sde.sampling_eps
    shape = (N_SAMPLES, 2)
    for predictor, corrector in (("reverse_diffusion", "langevin"), ("euler_maruyama", "ald")):
        pc = sampling.get_pc_sampler(sde, shape, predictor, corrector, IDENTITY, snr=0.16,
                                     eps=eps)
        assert_gaussian(pc(jax.random.key(3), score_fn)[0], data.means[0], data.stds[0], 0.02)
    # The ODE map never forgets its start, so start it from the exact p_T = N(mu, s^2 + 25).
    z = data.means[0] + np.sqrt(data.stds[0] ** 2 + 25.0) * np.asarray(
        jax.random.normal(jax.random.key(4), shape))
    ode = sampling.get_ode_sampler(sde, shape, IDENTITY, rtol=1e-4, atol=1e-4, eps=eps)
    assert_gaussian(ode(None, score_fn, jnp.asarray(z, jnp.float32))[0], data.means[0],
                    data.stds[0], 0.01)
    with pytest.raises(ValueError, match="ancestral"):
        sampling.get_pc_sampler(sde, shape, "ancestral_sampling", "none", IDENTITY, snr=0.16)


def test_ancestral_sampling_rejected_for_subvp_at_construction():
    with pytest.raises(ValueError, match="subVPSDE has none"):
        sampling.get_pc_sampler(SDES["subvp"](), SHAPE, "ancestral_sampling", "langevin",
                                IDENTITY, snr=0.16)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="ancestral_sampling.*euler_maruyama.*none"):
        sampling.get_predictor("heun")
    with pytest.raises(ValueError, match="ald.*langevin.*none"):
        sampling.get_corrector("hmc")
    with pytest.raises(ValueError, match="valid names"):
        sampling.get_pc_sampler(SDES["vp"](), SHAPE, "heun", "none", IDENTITY, snr=0.1)
    with pytest.raises(ValueError, match="dopri5"):
        sampling.get_ode_sampler(SDES["vp"](), SHAPE, IDENTITY, method="euler")


def test_predictor_registered_in_test_runs_unchanged():
    calls = []

    @sampling.register_predictor(name="test_only_halfway")
    class HalfwayPredictor(sampling.Predictor):
        """Deterministic: moves x halfway towards 1 and records that it was used."""

        def update_fn(self, rng, x, t):
            calls.append(1)
            x = 0.5 * (x + 1.0)
            return x, x

    try:
        assert sampling.get_predictor("test_only_halfway") is HalfwayPredictor
        sde = sde_lib.VPSDE(N=20)
        for predictor in ("test_only_halfway", HalfwayPredictor):
            sampler = sampling.get_pc_sampler(sde, (3, 2), predictor, "none", IDENTITY, snr=0.1)
            x, nfe = sampler(jax.random.key(0), lambda x, t: jnp.zeros_like(x))
            # After 20 halvings of the distance to 1 the samples sit at 1 (to 2^-20 |x_T - 1|).
            np.testing.assert_allclose(x, 1.0, atol=1e-4)
            assert nfe == 20
        assert calls, "the registered predictor was never used"
    finally:
        sampling._PREDICTORS.pop("test_only_halfway")


def _loops(jaxpr):
    """Loop primitives (while / scan) in `jaxpr`, searching nested calls but not loop bodies."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("while", "scan"):
            found.append(eqn)
            continue
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found.extend(_loops(sub))
    return found


def test_pc_sampler_is_one_compiled_program():
    sde = sde_lib.VESDE(N=300)
    traces = []

    def score_fn(x, t):
        traces.append(1)  # runs only while tracing
        return -x / (1.0 + sde.sigma(t)[:, None] ** 2)

    sampler = sampling.get_pc_sampler(sde, (8, 2), "reverse_diffusion", "langevin", IDENTITY,
                                      snr=0.16, n_steps=2)
    x1, nfe = sampler(jax.random.key(0), score_fn)
    n_traced = len(traces)
    # The corrector's and predictor's score calls are traced once each, not once per step.
    assert n_traced == 2 and nfe == 300 * 3
    x2, _ = sampler(jax.random.key(1), score_fn)
    assert len(traces) == n_traced, "the sampler retraced on a second call"
    assert not np.allclose(x1, x2)
    jaxpr = jax.make_jaxpr(lambda rng: sampler(rng, score_fn)[0])(jax.random.key(0))
    loops = _loops(jaxpr.jaxpr)
    assert len(loops) == 1, f"expected the whole sampler in one loop, found {len(loops)}"


def test_sampler_under_outer_jit_with_traced_parameters():
    sde = sde_lib.VPSDE(N=50)
    make_score_fn = lambda scale: (lambda x, t: -scale * x)
    sampler = sampling.get_pc_sampler(sde, (16, 3), "euler_maruyama", "langevin", IDENTITY,
                                      snr=0.16)
    jitted = jax.jit(lambda rng, scale: sampler(rng, make_score_fn(scale))[0])
    a = jitted(jax.random.key(0), 1.0)
    b = jitted(jax.random.key(0), 3.0)  # same compiled program, different traced parameter
    assert jitted._cache_size() == 1
    np.testing.assert_allclose(a, sampler(jax.random.key(0), make_score_fn(1.0))[0], rtol=1e-5,
                               atol=1e-5)
    assert not np.allclose(a, b)


def test_langevin_step_uses_batch_mean_norms():
    sde = sde_lib.VPSDE(N=100)
    x = jax.random.normal(jax.random.key(0), (6, 3, 2)) * jnp.arange(1, 7)[:, None, None]
    t = jnp.full((6,), 0.4)
    score_fn = lambda x, t: -x * jnp.arange(1.0, 7.0)[:, None, None]  # per-example norms differ
    snr = 0.2
    corrector = sampling.LangevinCorrector(sde, score_fn, snr, n_steps=1)
    x_new, x_mean = corrector.update_fn(jax.random.key(1), x, t)
    score = np.asarray(score_fn(x, t), np.float64)
    # x_mean = x + step score with ONE step size shared by the whole batch.
    steps = (np.asarray(x_mean, np.float64) - np.asarray(x)) / score
    step = steps.mean()
    np.testing.assert_allclose(steps, step, rtol=1e-4)
    # Recover the noise z from x = x_mean + sqrt(2 step) z and check the step-size rule.
    z = (np.asarray(x_new, np.float64) - np.asarray(x_mean)) / np.sqrt(2 * step)
    norm = lambda a: np.linalg.norm(a.reshape(len(a), -1), axis=-1).mean()
    alpha = float(sde.alphas[int(0.4 * 99)])
    np.testing.assert_allclose(step, 2 * alpha * (snr * norm(z) / norm(score)) ** 2, rtol=1e-4)
    # ALD: step 2 alpha (snr std_t)^2 per example.
    _, x_mean = sampling.AnnealedLangevinDynamics(sde, score_fn, snr, 1).update_fn(
        jax.random.key(1), x, t)
    std = float(sde.marginal_prob(x, t)[1][0])
    np.testing.assert_allclose((np.asarray(x_mean) - np.asarray(x)) / score,
                               2 * alpha * (snr * std) ** 2, rtol=1e-4)


_SHARDED_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import sampling, sde_lib
    assert jax.device_count() == 2
    sde = sde_lib.VESDE(N=100)
    score_fn = lambda x, t: -x * jnp.arange(1.0, 9.0)[:, None]
    corrector = sampling.LangevinCorrector(sde, score_fn, 0.2, n_steps=1)
    x = jax.random.normal(jax.random.key(0), (8, 4))
    t = jnp.full((8,), 0.5)
    update = jax.jit(corrector.update_fn)
    ref = update(jax.random.key(1), x, t)
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    xs = jax.device_put(x, NamedSharding(mesh, P("batch")))
    ts = jax.device_put(t, NamedSharding(mesh, P("batch")))
    out = update(jax.random.key(1), xs, ts)
    assert len(out[1].sharding.device_set) == 2
    np.testing.assert_allclose(out[1], ref[1], rtol=1e-5)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-5)
    print("OK")
""")


def test_langevin_step_is_global_on_a_sharded_batch():
    """On a batch sharded over two devices the jitted corrector equals the unsharded one."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=root,
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, cwd=root,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_ode_nfe_is_the_true_count():
    sde = sde_lib.VPSDE(N=100)
    calls = []
    base = DATA.score_fn(sde)

    def counting_score_fn(x, t):
        jax.debug.callback(lambda: calls.append(1))
        return base(x, t)

    for method in ("dopri5", "tsit5"):
        for denoise in (False, True):
            calls.clear()
            sampler = sampling.get_ode_sampler(sde, (64, 4), IDENTITY, denoise=denoise,
                                               method=method)
            _, nfe = sampler(jax.random.key(0), counting_score_fn)
            jax.effects_barrier()
            assert int(nfe) == len(calls) and int(nfe) > 20


def test_ode_sampler_scipy_matches_diffrax_from_same_latent():
    sde = SDES["vp"]()
    shape = (32, 4)
    z = jax.random.normal(jax.random.key(5), shape)
    score_fn = DATA.score_fn(sde)
    x_dfx, nfe_dfx = sampling.get_ode_sampler(sde, shape, IDENTITY, denoise=True)(
        None, score_fn, z)
    x_sp, nfe_sp = sampling.get_ode_sampler(sde, shape, IDENTITY, denoise=True,
                                            method="scipy_rk45")(None, score_fn, z)
    assert isinstance(nfe_sp, int) and nfe_sp > 20
    # Same method and tolerances: the step counts are alike, the solutions agree closely.
    assert abs(int(nfe_dfx) - nfe_sp) <= 0.25 * nfe_sp
    np.testing.assert_allclose(x_dfx, x_sp, atol=2e-3)


def test_get_sampling_fn():
    config = ml_collections.ConfigDict({"sampling": {
        "method": "pc", "predictor": "reverse_diffusion", "corrector": "langevin", "snr": 0.16,
        "n_steps_each": 2, "noise_removal": True, "probability_flow": False}})
    sde = sde_lib.VESDE(N=10)
    sampler = sampling.get_sampling_fn(config, sde, (4, 2), IDENTITY, 1e-5)
    x, nfe = sampler(jax.random.key(0), lambda x, t: -x)
    assert x.shape == (4, 2) and nfe == 30
    config.sampling.method = "ode"
    x, nfe = sampling.get_sampling_fn(config, sde, (4, 2), IDENTITY, 1e-5)(
        jax.random.key(0), lambda x, t: -x / (1 + sde.sigma(t)[:, None] ** 2))
    assert x.shape == (4, 2) and int(nfe) > 3
    config.sampling.method = "no_such_sampler"
    with pytest.raises(ValueError, match=r"(?s)'no_such_sampler'.*'ode'.*'pc'"):
        sampling.get_sampling_fn(config, sde, (4, 2), IDENTITY, 1e-5)
