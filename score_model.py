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
"""

from __future__ import annotations

import jax.numpy as jnp

import sde_lib
from models import utils as mutils
from sde_lib import batch_mul


class ScoreModel:
    """Any SDE with a Gaussian perturbation kernel: the network predicts the noise, scaled.

    labels = 999 t; score = -output / std(t). No discrete convention.
    """

    def __init__(self, sde: sde_lib.SDE, model, continuous: bool = True):
        self.sde, self.model, self.continuous = sde, model, bool(continuous)

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
            output, new_states = model_fn(x, self.labels(t), rng)
            score = self.output_to_score(output, t)
            return (score, new_states) if return_state else score

        return score_fn


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

    def __init__(self, sde: sde_lib.SDE, model, continuous: bool = True):
        super().__init__(sde, model, continuous=True)


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


def for_sde(sde: sde_lib.SDE, model, continuous: bool = True) -> ScoreModel:
    """The score model of `sde` and `model` under the convention of the SDE's class."""
    for cls in type(sde).__mro__:
        if cls in _CONVENTIONS:
            return _CONVENTIONS[cls](sde, model, continuous)
    return ScoreModel(sde, model, continuous)
