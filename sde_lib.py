"""Forward SDEs and their reverse-time counterparts (Song et al. 2021, Sec. 3 and App. B).

Every quantity a sampler, a loss or a score-model wrapper needs that differs between SDEs
is a method or property here, so generic code never dispatches on the SDE's type. A new SDE
subclass that implements `sde`, `marginal_prob`, `prior_sampling` and `prior_logp` works with
the Euler-Maruyama and reverse-diffusion predictors, the Langevin corrector, the ODE sampler
and the likelihood without touching any other file; registered with `@register_sde(name=...)`
(from the researcher's own file, loaded with `--config.plugins`) it is also a valid
`config.training.sde` for every mode of `main.py` (docs/extending.md).

Shapes: `x` is [B, ...] (images are NHWC), `t` is [B]. Per-example scalars such as the
diffusion coefficient are returned with shape [B] and broadcast with `batch_mul`.
"""

from __future__ import annotations

import abc
import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def batch_mul(a, b):
    """Multiplies a per-example array `a` [B] into `b` [B, ...] (or the other way round)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim < b.ndim:
        a = a.reshape(a.shape + (1,) * (b.ndim - a.ndim))
    elif b.ndim < a.ndim:
        b = b.reshape(b.shape + (1,) * (a.ndim - b.ndim))
    return a * b


def _as_float(x) -> jax.Array:
    """x as a float array: float dtypes are kept, anything else becomes the default float."""
    return jnp.asarray(x, jnp.result_type(x, float))


def sum_except_batch(x):
    """[B, ...] -> [B]: the sum over every axis but the first."""
    return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


# A score function: score_fn(x [B, ...], t [B]) -> the score, shaped like x.
ScoreFn = Callable[[jax.Array, jax.Array], jax.Array]


def ve_discrete_sigmas(sigma_min: float, sigma_max: float, N: int) -> np.ndarray:
    """SMLD's noise levels, geometric from sigma_min up to sigma_max: float64 [N].

    The one definition of the VE ladder: `VESDE.discrete_sigmas` and the networks' noise
    levels (`models.utils.get_sigmas`, which lists it from sigma_max down) both derive from it.
    """
    return np.exp(np.linspace(np.log(sigma_min), np.log(sigma_max), int(N), dtype=np.float64))


def vp_discrete_betas(beta_min: float, beta_max: float, N: int) -> np.ndarray:
    """DDPM's chain beta_i = linspace(beta_min / N, beta_max / N, N): float64 [N]."""
    return np.linspace(beta_min / N, beta_max / N, int(N), dtype=np.float64)


def _table(values) -> jax.Array:
    # Computed in float64 for accuracy, stored as jnp float32 so that code written for the
    # reference (`sde.discrete_sigmas[timestep]` with a traced index) works under jit.
    return jnp.asarray(np.asarray(values, np.float64), jnp.float32)


def timestep(t, N, T):
    """Index i = int(t (N - 1) / T) of the discrete step that continuous time t falls on."""
    return (t * (N - 1) / T).astype(jnp.int32)


class SDE(abc.ABC):
    """A forward SDE dx = f(x, t) dt + g(t) dw on t in [0, T], discretized into N steps."""

    # Name of the discrete-time training objective of this SDE's discretization, if any
    # ('smld' for VE, 'ddpm' for VP); see losses.get_loss_fn.
    discrete_objective: str | None = None

    def __init__(self, N: int):
        if int(N) < 1:
            raise ValueError(f"Number of discretization steps N must be >= 1, got {N}.")
        self.N = int(N)

    @property
    @abc.abstractmethod
    def T(self) -> float:
        """End time of the SDE."""

    @property
    def sampling_eps(self) -> float:
        """Smallest time a sampler integrates to (avoids the singular score at t = 0)."""
        return 1e-3

    @abc.abstractmethod
    def sde(self, x, t):
        """Returns (drift [B, ...], diffusion [B])."""

    @abc.abstractmethod
    def marginal_prob(self, x, t):
        """Parameters of p_t(x(t) | x(0) = x): (mean [B, ...], std [B])."""

    def perturb(self, x, t, z):
        """x(t) = mean + std z, a draw of p_t(x(t) | x(0) = x) given z ~ N(0, I) shaped like x
        (the perturbed data of Eq. 7). Returns (x(t), mean, std [B])."""
        mean, std = self.marginal_prob(x, t)
        return mean + batch_mul(std, z), mean, std

    @abc.abstractmethod
    def prior_sampling(self, rng, shape):
        """Draws x(T) ~ p_T, an array of `shape`."""

    @abc.abstractmethod
    def prior_logp(self, z):
        """log p_T(z) summed over all non-batch dimensions: [B]."""

    def discretize(self, x, t):
        """One step of the discretized SDE, x_{i+1} = x_i + f_i + G_i z_i.

        Euler-Maruyama by default; subclasses override with their exact discrete chains.
        Returns (f [B, ...], G [B]).
        """
        dt = self.T / self.N
        drift, diffusion = self.sde(x, t)
        return drift * dt, diffusion * jnp.sqrt(dt)

    # Quantities the samplers ask for. Defaults are valid for any SDE.

    def langevin_alpha(self, t):
        """The alpha_i of Algorithms 4-5 (Langevin step scale): [B]. 1 unless overridden."""
        return jnp.ones_like(t)

    def ancestral_update(self, x, t, score):
        """Ancestral sampling step (App. F): (x_mean [B, ...], noise std [B]).

        Only SDEs whose discretization has a known ancestral sampler implement it.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has no ancestral sampler; use it with VESDE or VPSDE, "
            "or choose predictor 'reverse_diffusion' or 'euler_maruyama'.")

    @property
    def has_ancestral_update(self) -> bool:
        return type(self).ancestral_update is not SDE.ancestral_update

    # The Gaussian marginal x_t = alpha(t) x_0 + sigma(t) z that the few-step samplers
    # (fast_samplers.py) are written against. Derived from `marginal_prob`, so any SDE with a
    # Gaussian perturbation kernel has them; subclasses add closed forms for speed/accuracy.

    def marginal_coefficients(self, t):
        """(alpha(t), sigma(t)) of p_t(x | x0) = N(alpha x0, sigma^2 I), each shaped like t."""
        t = _as_float(t)
        flat = t.reshape(-1)
        mean, std = self.marginal_prob(jnp.ones((flat.shape[0], 1), flat.dtype), flat)
        alpha = jnp.broadcast_to(mean[:, 0], flat.shape)
        sigma = jnp.broadcast_to(std, flat.shape)
        return alpha.reshape(t.shape), sigma.reshape(t.shape)

    def half_log_snr(self, t):
        """lambda(t) = log(alpha(t) / sigma(t)) (DPM-Solver's time variable), shaped like t.

        Must decrease strictly in t for the few-step samplers; exp(-lambda) = sigma / alpha is
        the noise level of EDM (Karras et al. 2022) for the rescaled variable x / alpha.
        """
        alpha, sigma = self.marginal_coefficients(t)
        return jnp.log(alpha) - jnp.log(sigma)

    def t_from_half_log_snr(self, lam):
        """The time t in [0, T] with half_log_snr(t) = lam, shaped like lam.

        Bisection (valid for any strictly decreasing lambda; 64 halvings reach float32
        resolution); VE, VP and sub-VP override it with closed forms.
        """
        lam = _as_float(lam)

        def halve(_, bounds):
            lo, hi = bounds
            mid = 0.5 * (lo + hi)
            above = self.half_log_snr(mid) > lam  # lambda decreases: the root lies later
            return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

        lo, hi = jax.lax.fori_loop(0, 64, halve, (jnp.zeros_like(lam), jnp.full_like(lam, self.T)))
        return 0.5 * (lo + hi)

    def reverse(self, score_fn, probability_flow: bool = False) -> SDE:
        """The reverse-time SDE (Eq. 6) or probability-flow ODE (Eq. 13) given `score_fn`.

        score_fn(x, t) -> score shaped like x.
        """
        return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE(SDE):
    """dx = [f - g^2 score] dt + g dw_bar (or the ODE dx = [f - g^2 score / 2] dt)."""

    def __init__(self, forward: SDE, score_fn, probability_flow: bool = False):
        super().__init__(forward.N)
        self.forward = forward
        self.score_fn = score_fn
        self.probability_flow = probability_flow

    @property
    def T(self):
        return self.forward.T

    @property
    def sampling_eps(self):
        return self.forward.sampling_eps

    def sde(self, x, t):
        drift, diffusion = self.forward.sde(x, t)
        score = self.score_fn(x, t)
        scale = 0.5 if self.probability_flow else 1.0
        drift = drift - batch_mul(diffusion**2 * scale, score)
        diffusion = jnp.zeros_like(diffusion) if self.probability_flow else diffusion
        return drift, diffusion

    def discretize(self, x, t):
        """Reverse discretization: x_i = x_{i+1} - f + G^2 score (+ G z), Eq. 46."""
        f, G = self.forward.discretize(x, t)
        score = self.score_fn(x, t)
        scale = 0.5 if self.probability_flow else 1.0
        rev_f = f - batch_mul(G**2 * scale, score)
        rev_G = jnp.zeros_like(G) if self.probability_flow else G
        return rev_f, rev_G

    def marginal_prob(self, x, t):
        raise NotImplementedError("The reverse SDE has no closed-form marginal.")

    def prior_sampling(self, rng, shape):
        return self.forward.prior_sampling(rng, shape)

    def prior_logp(self, z):
        return self.forward.prior_logp(z)


def _standard_normal_logp(z):
    D = np.prod(z.shape[1:])
    return -D / 2.0 * jnp.log(2 * jnp.pi) - sum_except_batch(z**2) / 2.0


def _t_from_log_mean_coeff(beta_0: float, beta_1: float, m):
    """Solves m = -t^2 (beta_1 - beta_0) / 4 - t beta_0 / 2 (m <= 0) for t >= 0.

    Written as 4 (-m) / (beta_0 + sqrt(beta_0^2 + 4 (beta_1 - beta_0) (-m))) to avoid the
    cancellation of the textbook root near t = 0.
    """
    return 4.0 * -m / (beta_0 + jnp.sqrt(beta_0**2 + 4.0 * (beta_1 - beta_0) * -m))


# The SDEs `config.training.sde` can name: the only list of valid names. A plugin adds its own
# subclass with `@register_sde(name=...)` (see docs/extending.md).
_SDES: dict[str, type] = {}


def register_sde(cls=None, *, name: str | None = None):
    """Class decorator: `@register_sde(name='my_sde')` lets `config.training.sde='my_sde'`
    build the class (default name: the class name). Names are case-insensitive, as the
    reference's `config.training.sde.lower()`. `get_sde` fills the constructor's arguments
    from the config by name."""

    def add(c):
        if not (isinstance(c, type) and issubclass(c, SDE)):
            raise TypeError(f"register_sde takes an SDE subclass, got {c!r}.")
        key = (c.__name__ if name is None else name).lower()
        if key in _SDES and _SDES[key] is not c:
            raise ValueError(f"An SDE named {key!r} is already registered ({_SDES[key]}).")
        _SDES[key] = c
        return c

    return add if cls is None else add(cls)


def registered_sdes() -> list[str]:
    """The registered SDE names, in registration order (the built-ins first)."""
    return list(_SDES)


def get_sde_class(name: str) -> type:
    """The SDE class registered under `name` (case-insensitive); ValueError lists the names."""
    key = str(name).lower()
    if key not in _SDES:
        raise ValueError(f"Unknown SDE {name!r}; valid names: {registered_sdes()}.")
    return _SDES[key]


@register_sde(name="vesde")
class VESDE(SDE):
    """Variance-exploding SDE, the continuous limit of SMLD / NCSN (Eq. 9)."""

    discrete_objective = "smld"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000):
        super().__init__(N)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        # SMLD's noise levels, ascending: [N] float32.
        self.discrete_sigmas = _table(ve_discrete_sigmas(sigma_min, sigma_max, N))

    @property
    def T(self):
        return 1.0

    @property
    def sampling_eps(self):
        return 1e-5

    def sigma(self, t):
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x, t):
        drift = jnp.zeros_like(x)
        diffusion = self.sigma(t) * np.sqrt(2 * (np.log(self.sigma_max) - np.log(self.sigma_min)))
        return drift, diffusion

    def marginal_prob(self, x, t):
        return x, self.sigma(t)

    def t_from_half_log_snr(self, lam):
        # lambda = -log sigma(t) = -log sigma_min - t log(sigma_max / sigma_min).
        lam = _as_float(lam)
        return (-lam - np.log(self.sigma_min)) / np.log(self.sigma_max / self.sigma_min)

    def prior_sampling(self, rng, shape):
        return jax.random.normal(rng, shape) * self.sigma_max

    def prior_logp(self, z):
        D = np.prod(z.shape[1:])
        return (-D / 2.0 * np.log(2 * np.pi * self.sigma_max**2)
                - sum_except_batch(z**2) / (2 * self.sigma_max**2))

    def _adjacent_sigmas(self, t):
        i = timestep(t, self.N, self.T)
        sigmas = self.discrete_sigmas
        sigma = sigmas[i]
        adjacent = jnp.where(i == 0, jnp.zeros_like(sigma), sigmas[jnp.maximum(i - 1, 0)])
        return sigma, adjacent

    def discretize(self, x, t):
        """SMLD: x_{i+1} = x_i + sqrt(sigma_i^2 - sigma_{i-1}^2) z_i."""
        sigma, adjacent = self._adjacent_sigmas(t)
        return jnp.zeros_like(x), jnp.sqrt(sigma**2 - adjacent**2)

    def ancestral_update(self, x, t, score):
        """SMLD ancestral step (Eq. 47)."""
        sigma, adjacent = self._adjacent_sigmas(t)
        x_mean = x + batch_mul(sigma**2 - adjacent**2, score)
        std = jnp.sqrt(adjacent**2 * (sigma**2 - adjacent**2) / sigma**2)
        return x_mean, std


@register_sde(name="vpsde")
class VPSDE(SDE):
    """Variance-preserving SDE, the continuous limit of DDPM (Eq. 11)."""

    discrete_objective = "ddpm"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(N)
        self.beta_0 = float(beta_min)
        self.beta_1 = float(beta_max)
        # DDPM's discrete chain; every table is [N] float32 (computed in float64).
        betas = vp_discrete_betas(beta_min, beta_max, N)
        alphas_cumprod = np.cumprod(1.0 - betas)
        self.discrete_betas = _table(betas)
        self.alphas = _table(1.0 - betas)
        self.alphas_cumprod = _table(alphas_cumprod)
        self.sqrt_alphas_cumprod = _table(np.sqrt(alphas_cumprod))
        self.sqrt_1m_alphas_cumprod = _table(np.sqrt(1.0 - alphas_cumprod))

    @property
    def T(self):
        return 1.0

    def beta(self, t):
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def _log_mean_coeff(self, t):
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def sde(self, x, t):
        beta_t = self.beta(t)
        return batch_mul(-0.5 * beta_t, x), jnp.sqrt(beta_t)

    def marginal_prob(self, x, t):
        log_mean_coeff = self._log_mean_coeff(t)
        mean = batch_mul(jnp.exp(log_mean_coeff), x)
        std = jnp.sqrt(1.0 - jnp.exp(2.0 * log_mean_coeff))
        return mean, std

    def t_from_half_log_snr(self, lam):
        # alpha^2 = e^{2m} and sigma^2 = 1 - e^{2m}, so e^{2m} = sigmoid(2 lambda).
        m = -0.5 * jax.nn.softplus(-2.0 * _as_float(lam))
        return _t_from_log_mean_coeff(self.beta_0, self.beta_1, m)

    def prior_sampling(self, rng, shape):
        return jax.random.normal(rng, shape)

    def prior_logp(self, z):
        return _standard_normal_logp(z)

    def discretize(self, x, t):
        """DDPM: x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z_i."""
        i = timestep(t, self.N, self.T)
        beta, alpha = self.discrete_betas[i], self.alphas[i]
        f = batch_mul(jnp.sqrt(alpha), x) - x
        return f, jnp.sqrt(beta)

    def langevin_alpha(self, t):
        return self.alphas[timestep(t, self.N, self.T)]

    def ancestral_update(self, x, t, score):
        """DDPM ancestral step: x_mean = (x + beta_i s) / sqrt(1 - beta_i), std = sqrt(beta_i)."""
        beta = self.discrete_betas[timestep(t, self.N, self.T)]
        x_mean = batch_mul(1.0 / jnp.sqrt(1.0 - beta), x + batch_mul(beta, score))
        return x_mean, jnp.sqrt(beta)


@register_sde(name="subvpsde")
class subVPSDE(SDE):
    """Sub-VP SDE (Eq. 12): same drift as VP, diffusion shrunk so variances stay below VP's."""

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000):
        super().__init__(N)
        self.beta_0 = float(beta_min)
        self.beta_1 = float(beta_max)
        # The reference's Langevin corrector reads `alphas` for sub-VP too but never defined
        # them; we use the VP chain's alphas, which share the drift. [N] float32.
        betas = vp_discrete_betas(beta_min, beta_max, N)
        self.discrete_betas = _table(betas)
        self.alphas = _table(1.0 - betas)

    @property
    def T(self):
        return 1.0

    def beta(self, t):
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    def _log_mean_coeff(self, t):
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def sde(self, x, t):
        beta_t = self.beta(t)
        discount = 1.0 - jnp.exp(-2.0 * self.beta_0 * t - (self.beta_1 - self.beta_0) * t**2)
        return batch_mul(-0.5 * beta_t, x), jnp.sqrt(beta_t * discount)

    def marginal_prob(self, x, t):
        log_mean_coeff = self._log_mean_coeff(t)
        mean = batch_mul(jnp.exp(log_mean_coeff), x)
        std = 1.0 - jnp.exp(2.0 * log_mean_coeff)
        return mean, std

    def t_from_half_log_snr(self, lam):
        # e^lambda = u / (1 - u^2) with u = e^m, so 1/u = (e^{-lambda} + sqrt(e^{-2 lambda} + 4))
        # / 2; -m = log(1/u) is formed as log1p(1/u - 1) so small t keeps its precision.
        e = jnp.exp(-_as_float(lam))
        m = -jnp.log1p(0.5 * (e + e**2 / (jnp.sqrt(e**2 + 4.0) + 2.0)))
        return _t_from_log_mean_coeff(self.beta_0, self.beta_1, m)

    def prior_sampling(self, rng, shape):
        return jax.random.normal(rng, shape)

    def prior_logp(self, z):
        return _standard_normal_logp(z)

    def langevin_alpha(self, t):
        return self.alphas[timestep(t, self.N, self.T)]


# Constructor arguments read from another config key than `config.model.<argument>`.
_ARGUMENT_KEYS = {"N": "model.num_scales"}


def sde_kwargs(config, cls: type) -> dict:
    """The keyword arguments `get_sde` passes to SDE class `cls`, read from the config by name.

    Each argument of `cls.__init__` is read from `config.model.<argument>` (`N` from
    `config.model.num_scales`, the reference's keys); an argument the config lacks keeps the
    constructor's default, and a required one raises ValueError naming the key. Extra keys of
    a plugin's SDE are declared with `configs.register_defaults({'model.<argument>': ...})`.
    """
    kwargs = {}
    for arg in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if arg.kind in (arg.VAR_POSITIONAL, arg.VAR_KEYWORD):
            continue
        key = _ARGUMENT_KEYS.get(arg.name, f"model.{arg.name}")
        section, _, field = key.partition(".")
        node = config.get(section) if hasattr(config, "get") else None
        if node is not None and hasattr(node, "get") and field in node:
            kwargs[arg.name] = node[field]
        elif arg.default is arg.empty:
            raise ValueError(f"SDE {cls.__name__} needs argument {arg.name!r}, but the config "
                             f"has no key {key} (declare it with configs.register_defaults).")
    return kwargs


def get_sde(config) -> SDE:
    """Builds the SDE named by `config.training.sde` (see `register_sde`), its constructor's
    arguments filled from the config by name (`sde_kwargs`)."""
    cls = get_sde_class(config.training.sde)
    return cls(**sde_kwargs(config, cls))
