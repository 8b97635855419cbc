"""SparseGPT (Frantar & Alistarh, ICML 2023) as a method: the input Hessian H = Σ x xᵀ
as its statistic, and the layer-wise OBS pruning with weight reconstruction of
copal.obs (written from the paper's Algorithm 1) as its prune."""

import torch
from pydantic import Field

from copal.methods.base import Method, Statistic
from copal.obs import InverseFactors, sparsegpt_prune
from copal.options import Strict


class SparseGPTOptions(Strict):
    """The config's `sparsegpt:` section (COPAL's `reconstruct` variant uses it too)."""

    blocksize: int = Field(128, gt=0, description="columns per OBS block")
    dampening: float = Field(0.01, gt=0, description="λ = dampening · mean(diag H) added to H's diagonal")


class Hessian(Statistic):
    """H = Σ x xᵀ."""

    input_only = True

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

    def __init__(self, blocksize: int = 128, dampening: float = 0.01):
        self.blocksize = blocksize
        self.dampening = dampening
        self.factors = InverseFactors()

    @classmethod
    def from_config(cls, config):
        return cls(config.sparsegpt.blocksize, config.sparsegpt.dampening)

    def prune(self, weight, stat, structure, forced_prune=None, layer=None):
        return sparsegpt_prune(weight, stat, structure, forced_prune, self.blocksize, self.dampening, layer,
                               factors=self.factors)

    def finish_block(self):
        self.factors.clear()
