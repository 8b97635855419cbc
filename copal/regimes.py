"""Regimes: what the statistic and the weights are at step t.

| regime     | base weights       | statistic used for the score          |
|------------|--------------------|---------------------------------------|
| sequential | W_{t-1} (pruned)   | S_t; pruned weights stay pruned        |
| reprune    | W0                 | S_t                                    |
| accumulate | W0                 | C_t = C_{t-1} ⊕ S_t/scale(S_t)         |
| joint      | W0                 | S over the pooled data of D_1..D_t     |

`StepPolicy` answers the layer-wise pass's two questions per layer (base
weight; new weight given the fresh statistic) and records masks, the
accumulated statistic and reconstructed weights into the step's writer.
"""

import torch

from copal.masks import Structure, check_fits
from copal.methods import Method, accumulate
from copal.model import DenseWeights
from copal.state import StepState, StepWriter

REGIMES = ("sequential", "reprune", "accumulate", "joint")


class StepPolicy:
    def __init__(self, method: Method, regime: str, structure: Structure, dense: DenseWeights,
                 parent: StepState | None, writer: StepWriter, method_options: dict,
                 accumulate_options: dict, precomputed: dict[str, torch.Tensor] | None = None):
        self.method = method
        self.regime = regime
        self.structure = structure
        self.dense = dense
        self.parent = parent
        self.writer = writer
        self.method_options = method_options
        self.accumulate_options = accumulate_options
        self.precomputed = precomputed

    def base_weight(self, name: str) -> torch.Tensor:
        if self.regime == "sequential" and self.parent is not None:
            return self.parent.weight(name, self.dense)
        return self.dense.get(name)

    def _statistic(self, name: str, fresh: torch.Tensor | None) -> torch.Tensor | None:
        if self.precomputed is not None:
            fresh = self.precomputed.pop(name)
        if self.regime != "accumulate" or fresh is None:
            return fresh
        previous = self.parent.sensitivity(name) if self.parent is not None else None
        combined = accumulate(previous, fresh, self.method.statistic, **self.accumulate_options)
        self.writer.sensitivity.add(name, combined)
        return combined

    def prune_layer(self, name: str, base: torch.Tensor, fresh: torch.Tensor | None) -> torch.Tensor:
        check_fits(self.structure, name, tuple(base.shape))
        stat = self._statistic(name, fresh)
        forced = None
        if self.regime == "sequential" and self.parent is not None:
            forced = ~self.parent.mask(name)
        mask, new_weight = self.method.prune(base, stat, self.structure, forced, layer=name, **self.method_options)
        if new_weight is not None:
            new_weight = new_weight.to(base.dtype)
            self.writer.weights.add(name, new_weight)
        else:
            new_weight = base * mask.to(base.device, base.dtype)
        self.writer.add_mask(name, mask, new_weight)  # sparsity: the zeros of the weight the layer ends with
        return new_weight

    def finish_block(self, index: int) -> None:
        self.writer.finish_block(index)
