"""Losses and the train step, checked against closed-form expectations for Gaussian data."""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import integrate

import losses
import sde_lib
from models import utils as mutils

MU, S = 0.5, 0.7  # data ~ N(MU, S^2 I)
SHAPE = (4, 4, 1)


class ExactGaussianNet(nn.Module):
    """Network whose output is the exact score of N(MU, S^2 I), in the SDE's convention.

    A trainable `scale` (init `init_scale`) multiplies the output, so scale != 1 is a
    perturbed score.
    """

    sde: sde_lib.SDE
    continuous: bool = True
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x, labels, train=False):
        scale = self.param("scale", lambda _: jnp.asarray(self.init_scale))
        sde = self.sde
        if self.continuous:
            if isinstance(sde, sde_lib.VESDE):
                t = jnp.log(labels / sde.sigma_min) / np.log(sde.sigma_max / sde.sigma_min)
            else:
                t = labels / 999.0
            mean, std = sde.marginal_prob(jnp.full_like(x, MU), t)
            m = mean[:, 0, 0, 0] / MU
            var = m**2 * S**2 + std**2
            score = -sde_lib.batch_mul(1.0 / var, x - mean)
            out = score if isinstance(sde, sde_lib.VESDE) else -sde_lib.batch_mul(std, score)
        elif isinstance(sde, sde_lib.VESDE):  # SMLD: labels index sigmas from sigma_max down
            sigma = sde.discrete_sigmas[::-1][labels]
            out = -sde_lib.batch_mul(1.0 / (S**2 + sigma**2), x - MU)
        else:  # DDPM: the exact epsilon prediction E[eps | x_i]
            abar = sde.alphas_cumprod[labels]
            var = abar * S**2 + 1 - abar
            out = sde_lib.batch_mul(jnp.sqrt(1 - abar) / var, x - sde_lib.batch_mul(
                jnp.sqrt(abar), jnp.full_like(x, MU)))
        return out * scale


def _data(n, seed=0):
    return MU + S * jax.random.normal(jax.random.PRNGKey(seed), (n,) + SHAPE)


def _mean_loss(loss_fn, params, n=40000, repeats=4):
    vals = []
    for r in range(repeats):
        loss, _ = jax.jit(loss_fn)(jax.random.PRNGKey(100 + r), params, {}, _data(n, r))
        vals.append(float(loss))
    return np.mean(vals), np.std(vals) / np.sqrt(repeats)


SDES = {
    "ve": lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=5.0, N=100),
    "vp": lambda: sde_lib.VPSDE(N=100),
    "subvp": lambda: sde_lib.subVPSDE(N=100),
}


def _closed_form_dsm(sde, likelihood_weighting, eps=1e-5):
    """E_t E ||std s* + z||^2 / D = E_t[m^2 S^2 / (m^2 S^2 + std^2)] (times g^2/std^2 if LW)."""

    def integrand(t):
        tt = jnp.asarray([t])
        mean, std = sde.marginal_prob(jnp.ones((1, 1)), tt)
        m, std = float(mean[0, 0]), float(std[0])
        value = m**2 * S**2 / (m**2 * S**2 + std**2)
        if likelihood_weighting:
            g = float(sde.sde(jnp.zeros((1, 1)), tt)[1][0])
            value *= g**2 / std**2
        return value

    # Integrate over log t: the likelihood-weighted integrand grows like 1/t near t = 0.
    # epsrel: the integrand is evaluated in float32.
    total = integrate.quad(lambda u: integrand(np.exp(u)) * np.exp(u), np.log(eps),
                           np.log(sde.T), limit=200, epsrel=1e-6)[0]
    return total / (sde.T - eps)


@pytest.mark.parametrize("name", list(SDES))
def test_dsm_loss_at_exact_score_matches_closed_form(name):
    sde = SDES[name]()
    model = ExactGaussianNet(sde)
    loss_fn = losses.get_sde_loss_fn(sde, model, train=False, reduce_mean=True,
                                     likelihood_weighting=False)
    got, se = _mean_loss(loss_fn, {"scale": jnp.asarray(1.0)})
    want = _closed_form_dsm(sde, likelihood_weighting=False)
    assert abs(got - want) < max(4 * se, 0.01 * want), (got, want, se)
    perturbed, _ = _mean_loss(loss_fn, {"scale": jnp.asarray(1.3)})
    assert perturbed > got + 4 * se


def test_dsm_loss_likelihood_weighting_and_sum_reduction():
    sde = sde_lib.VPSDE(N=100)
    model = ExactGaussianNet(sde)
    lw = losses.get_sde_loss_fn(sde, model, train=False, reduce_mean=True,
                                likelihood_weighting=True)
    got, se = _mean_loss(lw, {"scale": jnp.asarray(1.0)}, repeats=8)
    want = _closed_form_dsm(sde, likelihood_weighting=True)
    assert abs(got - want) < max(4 * se, 0.02 * want), (got, want, se)
    # reduce_mean=False is half the sum over the D dimensions.
    D = int(np.prod(SHAPE))
    mean_fn = losses.get_sde_loss_fn(sde, model, train=False, reduce_mean=True)
    sum_fn = losses.get_sde_loss_fn(sde, model, train=False, reduce_mean=False)
    args = (jax.random.PRNGKey(3), {"scale": jnp.asarray(1.0)}, {}, _data(64))
    np.testing.assert_allclose(sum_fn(*args)[0], 0.5 * D * mean_fn(*args)[0], rtol=1e-5)


def test_sde_loss_default_is_likelihood_weighted_as_in_the_reference():
    sde = sde_lib.VPSDE(N=100)
    model = ExactGaussianNet(sde)
    args = (jax.random.PRNGKey(5), {"scale": jnp.asarray(1.3)}, {}, _data(64))
    loss = lambda **kw: float(losses.get_sde_loss_fn(sde, model, True, **kw)(*args)[0])
    weighted, unweighted = loss(likelihood_weighting=True), loss(likelihood_weighting=False)
    assert loss() == weighted
    assert abs(weighted - unweighted) > 0.1 * abs(unweighted)
    # get_loss_fn / get_step_fn take the config's choice explicitly; their default is False.
    via_loss_fn = losses.get_loss_fn(sde, model, True, reduce_mean=True)(*args)[0]
    assert float(via_loss_fn) == unweighted


@pytest.mark.parametrize("fn,leading", [
    (losses.get_sde_loss_fn, [("sde", None), ("model", None), ("train", None),
                              ("reduce_mean", True), ("continuous", True),
                              ("likelihood_weighting", True), ("eps", 1e-5)]),
    (losses.get_smld_loss_fn, [("vesde", None), ("model", None), ("train", None),
                               ("reduce_mean", False)]),
    (losses.get_ddpm_loss_fn, [("vpsde", None), ("model", None), ("train", None),
                               ("reduce_mean", True)]),
    (losses.get_step_fn, [("sde", None), ("model", None), ("train", None), ("optimizer", None),
                          ("reduce_mean", False), ("continuous", True),
                          ("likelihood_weighting", False)]),
])
def test_factories_keep_the_reference_argument_order_and_defaults(fn, leading):
    # Positional calls written for yang-song/score_sde's losses.py mean the same here.
    params = list(inspect.signature(fn).parameters.values())[:len(leading)]
    empty = inspect.Parameter.empty
    got = [(p.name, None if p.default is empty else p.default) for p in params]
    assert got == leading


@pytest.mark.parametrize("name", ["ve", "vp"])
def test_discrete_losses_at_exact_score_match_closed_form(name):
    sde = SDES[name]()
    model = ExactGaussianNet(sde, continuous=False)
    loss_fn = losses.get_loss_fn(sde, model, train=False, reduce_mean=True, continuous=False)
    got, se = _mean_loss(loss_fn, {"scale": jnp.asarray(1.0)})
    if name == "ve":  # sigma^2 ||s* + z / sigma||^2 per dim = S^2 / (S^2 + sigma^2)
        want = np.mean(S**2 / (S**2 + sde.discrete_sigmas**2))
    else:  # ||eps* - eps||^2 per dim = posterior variance of eps = abar S^2 / var
        abar = sde.alphas_cumprod
        want = np.mean(abar * S**2 / (abar * S**2 + 1 - abar))
    assert abs(got - want) < max(4 * se, 0.01 * want), (got, want, se)
    perturbed, _ = _mean_loss(loss_fn, {"scale": jnp.asarray(0.7)})
    assert perturbed > got + 4 * se


def test_discrete_loss_unavailable_for_subvp():
    sde = sde_lib.subVPSDE(N=10)
    with pytest.raises(ValueError, match="Discrete training is not defined for subVPSDE"):
        losses.get_loss_fn(sde, ExactGaussianNet(sde), train=True, continuous=False)


class TinyScoreNet(nn.Module):
    """A small MLP score model on flattened inputs with a sinusoidal noise-level input."""

    config: ml_collections.ConfigDict = None

    @nn.compact
    def __call__(self, x, labels, train=False):
        h = x.reshape(x.shape[0], -1)
        emb = jnp.stack([jnp.sin(labels / 100.0 * k) for k in (1.0, 3.0, 9.0)]
                        + [jnp.cos(labels / 100.0 * k) for k in (1.0, 3.0, 9.0)], axis=-1)
        h = jnp.concatenate([h, emb], axis=-1)
        h = nn.Dense(64)(h)
        h = nn.swish(h)
        h = nn.Dropout(0.1, deterministic=not train)(h)
        h = nn.Dense(int(np.prod(x.shape[1:])))(h)
        return h.reshape(x.shape)


def _config(lr=1e-2, warmup=0, grad_clip=1.0):
    c = ml_collections.ConfigDict()
    c.optim = ml_collections.ConfigDict(dict(optimizer="Adam", lr=lr, beta1=0.9, eps=1e-8,
                                             warmup=warmup, grad_clip=grad_clip,
                                             weight_decay=0.0))
    return c


def _train_setup(ema_rate=0.9, unroll=False, model=None):
    sde = sde_lib.VPSDE(N=100)
    model = model or TinyScoreNet()
    params = model.init({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                        jnp.zeros((1,) + SHAPE), jnp.ones((1,)))["params"]
    _, state, optimizer = losses.init_train_state(jax.random.PRNGKey(2), _config(), model=model,
                                                  params=params, states={})
    train_step = jax.jit(losses.get_step_fn(sde, model, train=True, optimizer=optimizer,
                                            reduce_mean=True, ema_rate=ema_rate,
                                            unroll=unroll))
    eval_step = jax.jit(losses.get_step_fn(sde, model, train=False, reduce_mean=True))
    return state, train_step, eval_step


def test_training_lowers_loss_on_gaussian_data():
    state, train_step, eval_step = _train_setup(ema_rate=0.0)  # EMA = current params
    eval_batch = _data(4096, seed=99)[None]
    _, before = eval_step(state, eval_batch)
    for i in range(60):
        state, _ = train_step(state, _data(5 * 128, seed=i).reshape((5, 128) + SHAPE))
    _, after = eval_step(state, eval_batch)
    assert int(state.step) == 300
    assert float(after[0]) < 0.6 * float(before[0]), (before, after)


def test_ema_follows_its_formula():
    rate = 0.9
    state, train_step, _ = _train_setup(ema_rate=rate)
    state1, _ = train_step(state, _data(32)[None])
    state2, _ = train_step(state1, _data(32, seed=1)[None])
    expected = jax.tree_util.tree_map(lambda e, p: rate * e + (1 - rate) * p,
                                      state1.params_ema, state2.params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                           state2.params_ema, expected)
    # after the first step the EMA mixes the initial and the updated parameters
    expected1 = jax.tree_util.tree_map(lambda e, p: rate * e + (1 - rate) * p,
                                       state.params, state1.params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                           state1.params_ema, expected1)


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
def test_n_jitted_steps_equals_single_steps(unroll):
    state, train_step, _ = _train_setup(unroll=unroll)
    batch = _data(5 * 16).reshape((5, 16) + SHAPE)
    scanned, scanned_losses = train_step(state, batch)
    single = state
    single_losses = []
    for i in range(5):
        single, loss = train_step(single, batch[i:i + 1])
        single_losses.append(float(loss[0]))
    assert int(scanned.step) == int(single.step) == 5
    np.testing.assert_allclose(np.asarray(scanned_losses), single_losses, rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                           scanned.params, single.params)


def test_optimizer_warmup_and_clipping():
    params = {"w": jnp.zeros(3)}
    grads = {"w": jnp.asarray([30.0, 40.0, 0.0])}  # global norm 50
    opt = losses.get_optimizer(_config(lr=1.0, warmup=4, grad_clip=1.0))
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    # first update: count 0 -> learning rate 0
    np.testing.assert_allclose(updates["w"], 0.0)
    adam_state = state[1][0]
    np.testing.assert_allclose(adam_state.mu["w"], 0.1 * np.array([0.6, 0.8, 0.0]), rtol=1e-6)
    updates, state = opt.update(grads, state, params)
    # second update: lr = 1/4; Adam's bias-corrected direction for a constant gradient is sign
    np.testing.assert_allclose(updates["w"][:2], -0.25, rtol=1e-4)
    # a negative clip disables clipping: the first moment keeps the raw gradient
    opt = losses.get_optimizer(_config(lr=1.0, warmup=0, grad_clip=-1.0))
    state = opt.init(params)
    _, state = opt.update(grads, state, params)
    np.testing.assert_allclose(state[0].mu["w"], 0.1 * np.asarray(grads["w"]), rtol=1e-6)


def test_cosine_decay_follows_its_formula_and_ends_at_zero():
    # lr_t = lr min(t / warmup, 1) (1 + cos(pi (t - warmup) / (n_iters - warmup))) / 2, t the
    # updates already made; Adam's bias-corrected step for a constant gradient is -lr_t sign(g).
    c = _config(lr=0.5, warmup=2, grad_clip=-1.0)
    c.optim.lr_decay = "cosine"
    c.training = ml_collections.ConfigDict(dict(n_iters=6))
    opt = losses.get_optimizer(c)
    params, grads = {"w": jnp.zeros(2)}, {"w": jnp.asarray([3.0, -2.0])}
    state = opt.init(params)
    for t in range(9):
        updates, state = opt.update(grads, state, params)
        expected = 0.5 * min(t / 2, 1.0) * (1 + np.cos(np.pi * np.clip((t - 2) / 4, 0, 1))) / 2
        np.testing.assert_allclose(updates["w"], [-expected, expected], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="decay_steps"):
        losses.adam(1.0, warmup=10, decay="cosine", decay_steps=10)
    with pytest.raises(ValueError, match="valid choices"):
        losses.adam(1.0, decay="linear")


def test_classifier_trains_with_the_same_optimizer_factory():
    # One optimizer factory: the classifier's settings give the same updates as the score
    # model's optimizer with those settings (the reference's warm-up: lr 0 at the first update).
    from run_lib import classifier

    c = ml_collections.ConfigDict(dict(classifier=dict(lr=1.0, warmup=4, grad_clip=1.0,
                                                       weight_decay=0.0)))
    params, grads = {"w": jnp.zeros(3)}, {"w": jnp.asarray([30.0, 40.0, 0.0])}
    ours, theirs = classifier.get_optimizer(c), losses.get_optimizer(_config(lr=1.0, warmup=4))
    s1, s2 = ours.init(params), theirs.init(params)
    for expected in (0.0, -0.25):
        u1, s1 = ours.update(grads, s1, params)
        u2, s2 = theirs.update(grads, s2, params)
        np.testing.assert_allclose(u1["w"][:2], expected, atol=1e-6, rtol=1e-4)
        np.testing.assert_allclose(u1["w"], u2["w"], rtol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_classifier_cross_entropy_with_label_smoothing(smoothing):
    from run_lib import classifier_steps

    logits = jax.random.normal(jax.random.PRNGKey(0), (6, 10)) * 3.0
    labels = jnp.arange(6) % 10
    logp = np.asarray(jax.nn.log_softmax(logits), np.float64)
    targets = np.full((6, 10), smoothing / 10)
    targets[np.arange(6), np.asarray(labels)] += 1.0 - smoothing
    np.testing.assert_allclose(classifier_steps.cross_entropy(logits, labels, smoothing),
                               -(targets * logp).sum(-1), rtol=1e-5)


def test_unknown_optimizer_is_refused():
    c = _config()
    c.optim.optimizer = "sgdx"
    with pytest.raises(ValueError, match="Unknown optimizer 'sgdx'; valid names"):
        losses.get_optimizer(c)


def test_registry_rejects_unknown_model():
    with pytest.raises(ValueError, match="Unknown model 'nope'; valid names"):
        mutils.get_model("nope")


_TRACES = []


class CountedScoreNet(TinyScoreNet):
    """TinyScoreNet that records the input shape each time it is traced."""

    def __call__(self, x, labels, train=False):
        _TRACES.append(x.shape)
        return super().__call__(x, labels, train)


@pytest.mark.parametrize("unroll", [False, True], ids=["scan", "unrolled"])
def test_n_jitted_steps_trace_the_network_once(unroll):
    # The unrolled steps (XLA:CPU's choice) trace one step and call it n times, as the scan
    # does: tracing NCSN++ takes seconds per copy.
    state, train_step, _ = _train_setup(unroll=unroll, model=CountedScoreNet())
    del _TRACES[:]  # the initialization's trace
    train_step.lower(state, _data(5 * 16).reshape((5, 16) + SHAPE))
    assert _TRACES == [(16,) + SHAPE]
