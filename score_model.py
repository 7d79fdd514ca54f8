"""A score model: an SDE, a network and the convention that joins them.

The network sees (x [B, H, W, C], labels [B]) and returns an array shaped like x; how t becomes
the labels and how the output becomes a score depend on the SDE and on the training objective
(continuous or discrete). This module is the one place those conventions live, as in EDM's
`*Precond` wrappers (NVlabs/edm training/networks.py) and k-diffusion's `external.py`; the
SDE classes keep only the SDE mathematics. The conventions are the paper's (yang-song/score_sde
models/utils.py, get_score_fn):

| SDE | continuous labels | continuous score | discrete labels | discrete score |
|---|---|---|---|---|
| VE | sigma(t) | output | round((T - t)(N - 1)) (int) | output |
| VP | 999 t | -output / std(t) | t (N - 1) | -output / sqrt(1 - alphabar_i), i = int(t (N - 1)) |
| sub-VP, others | 999 t | -output / std(t) | (continuous convention / none) | |

    score_model = score_model.for_sde(sde, model, continuous=True)
    score_fn = score_model.score_fn(params, model_state)     # score_fn(x, t) -> score

`parameterization='edm'` replaces these output conventions (for continuous training) by EDM's
preconditioning (Karras et al. 2022, Table 1, "Ours"), written against the Gaussian marginal
x_t = alpha x_0 + sigma z of any SDE: in y = x / alpha with noise level s = sigma / alpha the
network F predicts a blend of data and noise,

    D(y) = c_skip y + c_out F(c_in y, labels),   c_skip = sigma_d^2 / (s^2 + sigma_d^2),
    c_out = s sigma_d / sqrt(s^2 + sigma_d^2),   c_in = 1 / sqrt(s^2 + sigma_d^2),

and D is the data prediction x0_hat. In x this is F's input x / sqrt(sigma^2 + alpha^2 sigma_d^2)
and the score (alpha x0_hat - x) / sigma^2 = -x / d^2 + alpha sigma_d F / (sigma d), with
d^2 = sigma^2 + alpha^2 sigma_d^2. At high noise (alpha -> 0) the data prediction stays
bounded (c_out -> sigma_d) instead of dividing the network's error by alpha; the labels stay
the SDE's continuous ones.
"""

from __future__ import annotations

import jax.numpy as jnp

import sde_lib
from models import utils as mutils
from sde_lib import batch_mul

PARAMETERIZATIONS = ("eps", "edm")


class ScoreModel:
    """Any SDE with a Gaussian perturbation kernel: the network predicts the noise, scaled.

    labels = 999 t; score = -output / std(t). No discrete convention.
    """

    def __init__(self, sde: sde_lib.SDE, model, continuous: bool = True,
                 parameterization: str = "eps", sigma_data: float = 0.5):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization={parameterization!r}; valid: {PARAMETERIZATIONS}")
        self.sde, self.model, self.continuous = sde, model, bool(continuous)
        self.parameterization, self.sigma_data = parameterization, float(sigma_data)

    def _no_discrete(self):
        raise NotImplementedError(f"{type(self.sde).__name__} has no discrete label convention.")

    def labels(self, t):
        """Noise-level labels [B] fed to the network for times t [B]."""
        if not self.continuous:
            self._no_discrete()
        return t * 999.0

    def output_to_score(self, output, t):
        """The network's output [B, ...] at times t [B] as a score."""
        if not self.continuous:
            self._no_discrete()
        std = self.sde.marginal_prob(jnp.zeros_like(output), t)[1]
        return batch_mul(-1.0 / std, output)

    def score_fn(self, params, states, train: bool = False, return_state: bool = False):
        """score_fn(x [B, ...], t [B], rng=None) -> score [B, ...] (with `return_state`:
        (score, new_states)); `rng` draws dropout in training mode."""
        model_fn = mutils.get_model_fn(self.model, params, states, train=train)

        def score_fn(x, t, rng=None):
            if self.parameterization == "edm":
                return edm_score(x, t, rng)
            output, new_states = model_fn(x, self.labels(t), rng)
            score = self.output_to_score(output, t)
            return (score, new_states) if return_state else score

        def edm_score(x, t, rng):
            alpha, sigma = self.sde.marginal_coefficients(t)
            d = jnp.sqrt(sigma**2 + (alpha * self.sigma_data) ** 2)
            output, new_states = model_fn(batch_mul(1.0 / d, x), self.labels(t), rng)
            score = batch_mul(-1.0 / d**2, x) + batch_mul(alpha * self.sigma_data / (sigma * d),
                                                          output)
            return (score, new_states) if return_state else score

        return score_fn

    def loss_weight(self, t):
        """The factor [B] on the noise-prediction loss ||sigma score + z||^2 (lambda = sigma^2 in
        Eq. 7) that makes it EDM's loss for `parameterization='edm'`: uniform in F's units,
        (alpha sigma_d / d)^2 ||F - F_target||^2 times d^2 / (alpha sigma_d)^2; else 1."""
        if self.parameterization != "edm":
            return jnp.ones_like(t)
        alpha, sigma = self.sde.marginal_coefficients(t)
        return 1.0 + (sigma / (alpha * self.sigma_data)) ** 2


class VEScoreModel(ScoreModel):
    """NCSN / NCSN++ (VE): the network outputs the score itself (scaled by 1/sigma inside the
    network when `scale_by_sigma`); labels are sigma(t), or the index of the noise level,
    counted from sigma_max down, for the discrete SMLD objective."""

    def labels(self, t):
        if self.continuous:
            return self.sde.sigma(t)
        return jnp.round((self.sde.T - t) * (self.sde.N - 1)).astype(jnp.int32)

    def output_to_score(self, output, t):
        return output


class VPScoreModel(ScoreModel):
    """DDPM / DDPM++ (VP): an epsilon prediction; discrete labels are the unrounded step t (N - 1),
    the std is read from the discrete chain at its integer part."""

    def labels(self, t):
        return t * 999.0 if self.continuous else t * (self.sde.N - 1)

    def output_to_score(self, output, t):
        if self.continuous:
            return super().output_to_score(output, t)
        std = self.sde.sqrt_1m_alphas_cumprod[sde_lib.timestep(t, self.sde.N, self.sde.T)]
        return batch_mul(-1.0 / std, output)


class SubVPScoreModel(ScoreModel):
    """Sub-VP has no discrete chain of its own; like the reference, it uses the continuous
    convention whatever `continuous` says."""

    def __init__(self, sde: sde_lib.SDE, model, continuous: bool = True, **kwargs):
        super().__init__(sde, model, continuous=True, **kwargs)


# Conventions by SDE class; a subclass of a registered SDE inherits its convention.
_CONVENTIONS: dict[type, type] = {sde_lib.VESDE: VEScoreModel, sde_lib.VPSDE: VPScoreModel,
                                  sde_lib.subVPSDE: SubVPScoreModel}


def register_convention(sde_cls: type):
    """Class decorator: `cls` (a ScoreModel subclass) is the convention of `sde_cls` and its
    subclasses (a researcher's SDE whose network is fed other labels)."""

    def register(cls):
        _CONVENTIONS[sde_cls] = cls
        return cls

    return register


def for_sde(sde: sde_lib.SDE, model, continuous: bool = True, parameterization: str = "eps",
            sigma_data: float = 0.5) -> ScoreModel:
    """The score model of `sde` and `model` under the convention of the SDE's class (or EDM's
    preconditioning, `parameterization='edm'`, continuous only)."""
    if parameterization == "edm" and not continuous:
        raise ValueError("parameterization='edm' needs continuous training "
                         "(config.training.continuous=True).")
    kwargs = dict(parameterization=parameterization, sigma_data=sigma_data)
    for cls in type(sde).__mro__:
        if cls in _CONVENTIONS:
            return _CONVENTIONS[cls](sde, model, continuous, **kwargs)
    return ScoreModel(sde, model, continuous, **kwargs)
