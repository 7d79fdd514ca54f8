"""Closed-form marginals, scores and log-densities of Gaussian-mixture data under linear SDEs.

For data x0 ~ sum_k w_k N(mu_k, diag(s_k^2)) and any SDE whose perturbation kernel is
p_t(x | x0) = N(m(t) x0, std(t)^2 I) (VE, VP, sub-VP, ...), the marginal is again a mixture:
p_t = sum_k w_k N(m mu_k, diag(m^2 s_k^2 + std^2)). m(t) and std(t) are read from
`sde.marginal_prob` (checked against simulation in test_sde_lib.py), so the same helpers serve
test-only SDE subclasses.

Shapes: x is [B, ...] and is flattened to [B, D]; t is [B].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


class GaussianMixture:
    """Diagonal Gaussian mixture: weights [K], means [K, D], stds [K, D] (or broadcastable)."""

    def __init__(self, weights, means, stds):
        self.weights = np.asarray(weights, np.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = np.atleast_2d(np.asarray(means, np.float64))
        self.stds = np.broadcast_to(np.asarray(stds, np.float64), self.means.shape).copy()
        self.dim = self.means.shape[1]

    @classmethod
    def gaussian(cls, mean, std):
        """A single Gaussian N(mean, diag(std^2)); mean [D], std scalar or [D]."""
        mean = np.asarray(mean, np.float64)
        return cls([1.0], mean[None], np.broadcast_to(std, mean.shape)[None])

    def sample(self, rng, n: int) -> jax.Array:
        """n exact samples [n, D] (float32)."""
        k_rng, z_rng = jax.random.split(rng)
        k = jax.random.choice(k_rng, len(self.weights), (n,), p=jnp.asarray(self.weights))
        z = jax.random.normal(z_rng, (n, self.dim))
        return (jnp.asarray(self.means, jnp.float32)[k]
                + jnp.asarray(self.stds, jnp.float32)[k] * z)

    def marginal(self, sde, t):
        """Component means and variances of p_t: ([B, K, D], [B, K, D])."""
        ones = jnp.ones((t.shape[0], 1), jnp.float32)
        m, std = sde.marginal_prob(ones, t)
        m = m[:, 0][:, None, None]
        std = std[:, None, None]
        means = m * jnp.asarray(self.means, jnp.float32)[None]
        variances = m**2 * jnp.asarray(self.stds, jnp.float32)[None] ** 2 + std**2
        return means, variances

    def _component_logp(self, x, means, variances):
        x = x.reshape(x.shape[0], 1, -1)
        return (-0.5 * jnp.sum((x - means) ** 2 / variances + jnp.log(2 * jnp.pi * variances),
                               axis=-1)
                + jnp.log(jnp.asarray(self.weights, jnp.float32)))

    def log_prob_t(self, sde, x, t):
        """log p_t(x): [B]."""
        return jax.nn.logsumexp(self._component_logp(x, *self.marginal(sde, t)), axis=-1)

    def score_fn(self, sde):
        """The exact score grad_x log p_t(x), as a score_fn(x, t) -> shaped like x."""

        def score(x, t):
            means, variances = self.marginal(sde, t)
            resp = jax.nn.softmax(self._component_logp(x, means, variances), axis=-1)
            flat = x.reshape(x.shape[0], 1, -1)
            per_component = -(flat - means) / variances
            return jnp.sum(resp[..., None] * per_component, axis=1).reshape(x.shape)

        return score

    def class_log_prob_fn(self, sde):
        """Exact noise-conditional classifier log p_t(k | x) [B, K] (component responsibilities),
        as a log_prob_fn(x, t)."""

        def log_prob(x, t):
            return jax.nn.log_softmax(self._component_logp(x, *self.marginal(sde, t)), axis=-1)

        return log_prob

    def log_prob_np(self, x, m: float, std: float) -> np.ndarray:
        """float64 log-density [B] of x [B, D] under the mixture pushed through (m, std)."""
        x = np.asarray(x, np.float64).reshape(x.shape[0], 1, -1)
        variances = m**2 * self.stds[None] ** 2 + std**2
        comp = (-0.5 * np.sum((x - m * self.means[None]) ** 2 / variances
                              + np.log(2 * np.pi * variances), axis=-1) + np.log(self.weights))
        top = comp.max(axis=-1, keepdims=True)
        return (top + np.log(np.exp(comp - top).sum(axis=-1, keepdims=True)))[:, 0]
