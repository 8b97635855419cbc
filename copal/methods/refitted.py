"""A refit of the kept weights for the methods that only choose a mask (wanda,
magnitude): their config section's `refit: obs | pcg` (issue 20 item 2).

With a refit the method accumulates the layer input's Hessian H = Σ x xᵀ instead of
its own statistic (Wanda's Σ x_j² is H's diagonal, normalised by the same mean), chooses
its usual mask from it, then moves the kept weights towards min ‖X(Ŵ − W0)‖² on that
mask (copal.refit: `obs`, SparseGPT's one-pass update with the mask given; `pcg`, then
`refit_iterations` of conjugate gradient, as ALPS). The step stores H (state.hessian),
not the weights: they are recomputed from W0, the mask and H (Method.reweight).
Without a refit nothing changes: same statistic, same masks, weights W0 ⊙ mask.
"""

from typing import Literal

import torch
from pydantic import Field

from copal.masks import select_mask
from copal.methods.base import Method
from copal.methods.sparsegpt import Hessian
from copal.options import Strict
from copal.refit import PCGOptions, refit as refit_kept


class RefitOptions(Strict):
    """The config's `wanda:` and `magnitude:` sections. The OBS update's blocksize and
    dampening are the `sparsegpt:` section's, as for every rebuild of kept weights."""

    refit: Literal["none", "obs", "pcg"] = "none"
    refit_iterations: int = Field(8, ge=1, description="pcg: conjugate-gradient iterations per layer (at most)")


class MaskThenRefit(Method):
    """A method whose `score` chooses the mask; `refit` optionally rebuilds the kept weights."""

    def __init__(self, refit: str = "none", refit_iterations: int = 8, blocksize: int = 128,
                 dampening: float = 0.01):
        self.refit = RefitOptions(refit=refit, refit_iterations=refit_iterations).refit
        self.pcg = PCGOptions(iterations=refit_iterations)
        self.blocksize, self.dampening = blocksize, dampening
        if self.refit != "none":
            self.statistic = Hessian

    @classmethod
    def from_config(cls, config):
        return cls(**getattr(config, cls.name).model_dump(), blocksize=config.sparsegpt.blocksize,
                   dampening=config.sparsegpt.dampening)

    def prune(self, weight, stat, structure, forced_prune=None, layer=None):
        keep = select_mask(self.score(weight.float(), stat), structure, forced_prune)
        return keep, self.reweight(weight, stat, keep, layer)

    def reweight(self, weight, stat, keep, layer=None, structure=None):
        if self.refit == "none":
            return None
        return refit_kept(weight, stat, keep, self.refit, self.dampening, self.pcg, self.blocksize, layer)

    def options(self):
        return {"refit": self.refit, "refit_iterations": self.pcg.iterations, "blocksize": self.blocksize,
                "dampening": self.dampening}


def input_energy(stat: torch.Tensor) -> torch.Tensor:
    """Σ x_j² per input: the statistic itself, or a Hessian's diagonal."""
    return stat.diagonal() if stat.dim() == 2 else stat
