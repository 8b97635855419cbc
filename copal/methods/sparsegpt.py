"""SparseGPT (Frantar & Alistarh, ICML 2023) as a method: the input Hessian H = Σ x xᵀ
as its statistic, and the layer-wise OBS pruning with weight reconstruction of
copal.obs (written from the paper's Algorithm 1) as its prune."""

from typing import Literal

from pydantic import Field

from copal.masks import Structure
from copal.methods.base import Method, Statistic
from copal.obs import InverseFactors, resolved_solve, sparsegpt_prune
from copal.options import Strict
from copal.refit import PCGOptions, refit as refit_kept


class SparseGPTOptions(Strict):
    """The config's `sparsegpt:` section (COPAL's `reconstruct` variant uses it too)."""

    blocksize: int = Field(128, gt=0, description="columns per OBS block")
    dampening: float = Field(0.01, gt=0, description="λ = dampening · mean(diag H) added to H's diagonal")
    # `pcg`: after SparseGPT's own pass (its mask and OBS update), conjugate gradient from
    # that update towards the least-squares optimum of the kept weights (copal.refit).
    refit: Literal["obs", "pcg"] = Field("obs", description="obs: SparseGPT's update as it is; pcg: then refit")
    refit_iterations: int = Field(20, ge=1, description="pcg: conjugate-gradient iterations per layer (at most)")
    # how a column block's OBS errors are found (copal.obs.sparsegpt_prune): auto is batched on CUDA
    solve: Literal["auto", "loop", "batched"] = "auto"


class Hessian(Statistic):
    """H = Σ x xᵀ."""

    input_only = True
    symmetric = True

    @staticmethod
    def value_shape(out_features, in_features):
        return (in_features, in_features)

    def add(self, inputs, y):
        self.value.addmm_(inputs.x.t(), inputs.x)

    @staticmethod
    def scale(value):
        return value.diagonal().mean()


class SparseGPT(Method):
    name = "sparsegpt"
    statistic = Hessian
    stacks_rows = True  # per-row masks (unstructured per row, N:M) and a row-wise OBS update

    def __init__(self, blocksize: int = 128, dampening: float = 0.01, refit: str = "obs", refit_iterations: int = 20,
                 solve: str = "auto"):
        self.blocksize = blocksize
        self.dampening = dampening
        self.refit = refit
        self.solve = solve
        self.pcg = PCGOptions(iterations=refit_iterations)
        self.factors = InverseFactors()

    @classmethod
    def from_config(cls, config):
        return cls(**config.sparsegpt.model_dump())

    def prune(self, weight, stat, structure, forced_prune=None, layer=None):
        keep, updated = sparsegpt_prune(weight, stat, structure, forced_prune, self.blocksize, self.dampening, layer,
                                        factors=self.factors, solve=resolved_solve(self.solve, weight.device))
        return keep, self._refit(weight, stat, keep, updated, layer)

    def reweight(self, weight, stat, keep, layer=None, structure=None):
        # with the mask given, sparsegpt_prune runs the same updates as when it chose it
        _, updated = sparsegpt_prune(weight, stat, Structure(0.0), None, self.blocksize, self.dampening, layer,
                                     keep, self.factors, resolved_solve(self.solve, weight.device))
        return self._refit(weight, stat, keep, updated, layer)

    def _refit(self, weight, hessian, keep, updated, layer):
        """SparseGPT's `updated` weight as it is, or (refit: pcg) refit from there."""
        if self.refit != "pcg":
            return updated
        return refit_kept(weight, hessian, keep, "pcg", self.dampening, self.pcg, layer=layer, start=updated)

    def options(self):
        return {"blocksize": self.blocksize, "dampening": self.dampening, "refit": self.refit,
                "refit_iterations": self.pcg.iterations, "solve": self.solve}

    def finish_block(self):
        self.factors.clear()
