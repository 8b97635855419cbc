"""Pruning methods: a statistic accumulated over calibration tokens + a score.

A `Statistic` sees every calibration token of one linear layer (its input `x`
and output `y`) through a forward hook and keeps a running sum. A `Method`
turns (weight, statistic) into a keep-mask. Adding a method means adding one
statistic class and one score function to `METHODS`.
"""

from dataclasses import dataclass
from typing import Callable

import torch

from copal.masks import Structure, select_mask


class LayerInput:
    """One calibration batch's input to a linear layer, (tokens, in) float32, and
    what statistics derive from it, computed once for every layer that reads
    the same input (q/k/v, gate/up)."""

    def __init__(self, x: torch.Tensor):
        self.x = x
        self._abs: torch.Tensor | None = None

    @property
    def abs(self) -> torch.Tensor:
        if self._abs is None:
            self._abs = self.x.abs()
        return self._abs


class Statistic:
    """Running sum over calibration tokens for one linear layer (out, in)."""

    # True when the statistic is a function of the layer's input alone: layers
    # that read the same input then share one accumulated value.
    input_only = False

    def __init__(self, shape: tuple[int, int], device: torch.device):
        self.value = torch.zeros(self.value_shape(*shape), device=device)

    @staticmethod
    def value_shape(out_features: int, in_features: int) -> tuple[int, ...]:
        raise NotImplementedError

    def add(self, inputs: LayerInput, y: torch.Tensor) -> None:
        """inputs.x: (tokens, in), y: (tokens, out), both float32."""
        raise NotImplementedError

    @staticmethod
    def scale(value: torch.Tensor) -> torch.Tensor:
        """The typical size of a value, used to give every domain equal weight."""
        return value.mean()


class InputEnergy(Statistic):
    """Σ x_j² per input column (Wanda)."""

    input_only = True

    @staticmethod
    def value_shape(out_features, in_features):
        return (in_features,)

    def add(self, inputs, y):
        self.value += inputs.x.square().sum(0)


class Hessian(Statistic):
    """H = Σ x xᵀ (SparseGPT)."""

    input_only = True

    @staticmethod
    def value_shape(out_features, in_features):
        return (in_features, in_features)

    def add(self, inputs, y):
        self.value.addmm_(inputs.x.t(), inputs.x)

    @staticmethod
    def scale(value):
        return value.diagonal().mean()


class OutputSensitivity(Statistic):
    """S_ij = Σ_tokens |y_i|·|x_j| = (|Y|ᵀ|X|)_ij: the magnitude of ∂(½‖y‖²)/∂W_ij
    summed per token (COPAL's `output` sensitivity)."""

    @staticmethod
    def value_shape(out_features, in_features):
        return (out_features, in_features)

    def add(self, inputs, y):
        self.value.addmm_(y.abs().t(), inputs.abs)


@dataclass(frozen=True)
class Method:
    name: str
    statistic: type[Statistic] | None  # None: the score needs only the weights
    score: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None

    def prune(self, weight: torch.Tensor, stat: torch.Tensor | None, structure: Structure,
              forced_prune: torch.Tensor | None = None, **options) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(keep-mask, new weight or None when the kept weights are unchanged). `layer`
        (the layer's name, for messages) and method options a method does not use are ignored."""
        return select_mask(self.score(weight.float(), stat), structure, forced_prune), None


def _magnitude(weight, stat):
    return weight.abs()


def _wanda(weight, stat):
    return weight.abs() * stat.sqrt().unsqueeze(0)


def _copal(weight, stat):
    return weight.abs() * stat


class SparseGPT(Method):
    """Optimal-brain-surgeon pruning with weight reconstruction (Frantar & Alistarh, 2023)."""

    def prune(self, weight, stat, structure, forced_prune=None, blocksize=128, dampening=0.01, layer=None,
              **options):
        from copal.sparsegpt import sparsegpt_prune

        return sparsegpt_prune(weight, stat, structure, forced_prune, blocksize, dampening, layer)


METHODS: dict[str, Method] = {
    "magnitude": Method("magnitude", None, _magnitude),
    "wanda": Method("wanda", InputEnergy, _wanda),
    "sparsegpt": SparseGPT("sparsegpt", Hessian, None),
    "copal": Method("copal", OutputSensitivity, _copal),
}


def accumulate(previous: torch.Tensor | None, fresh: torch.Tensor, statistic: type[Statistic],
               normalize: bool = True, reduce: str = "sum") -> torch.Tensor:
    """C_t = C_{t-1} ⊕ S_t / scale(S_t): the continual statistic after one more domain."""
    if normalize:
        scale = statistic.scale(fresh)
        fresh = fresh / scale if scale > 0 else fresh
    if previous is None:
        return fresh
    previous = previous.to(fresh.device)
    return previous + fresh if reduce == "sum" else torch.maximum(previous, fresh)
