"""What every pruning method is made of: a statistic accumulated over calibration
tokens, and a score that turns (weight, statistic) into a keep-mask.

A `Statistic` sees every calibration token of one linear layer (its input `x`
and output `y`) through a forward hook and keeps a running sum. A `Method`
names its statistic, scores weights with it, and says how two domains'
statistics combine (the `accumulate` regime). A method whose statistic needs
the whole model at once (COPAL's loss gradient) computes it in
`model_statistic` instead of through hooks.
"""

from typing import ClassVar

import torch
from torch import nn

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
    # True when it holds one non-negative value per weight, (out, in): the accumulate
    # regime may then store it in a compact format (copal.state).
    per_weight = False
    # True when it is a symmetric (in, in) matrix (a Hessian): the accumulate regime may
    # store its upper half in a compact format (copal.codecs.HESSIAN_CODECS).
    symmetric = False

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


def accumulate(previous: torch.Tensor | None, fresh: torch.Tensor, scale: torch.Tensor | None,
               reduce: str = "sum") -> torch.Tensor:
    """C_t = C_{t-1} ⊕ S_t / scale(S_t) (no division when `scale` is None or not positive)."""
    if scale is not None and scale > 0:
        fresh = fresh / scale
    if previous is None:
        return fresh
    previous = previous.to(fresh.device)
    return previous + fresh if reduce == "sum" else torch.maximum(previous, fresh)


class Method:
    """A pruning method with its options. Subclasses set `name` and `statistic`
    and implement `score` (or `prune`, when the kept weights change too)."""

    name: ClassVar[str]
    # Accumulated by hooks during the layer-wise pass; None: the score needs no
    # per-layer statistic (magnitude), or `model_statistic` provides it.
    statistic: type[Statistic] | None = None
    # True: `model_statistic` computes the statistic (on the whole model, with the
    # step's base weights in place) before the layer-wise pass.
    whole_model = False
    # True: each row's mask and weights depend only on that row and the statistic, so
    # layers that share one statistic (q/k/v) may be pruned as one matrix of stacked rows.
    stacks_rows = False

    @classmethod
    def from_config(cls, config) -> "Method":
        """The method with the options a RunConfig gives it (default: none)."""
        return cls()

    def score(self, weight: torch.Tensor, stat: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def prune(self, weight: torch.Tensor, stat: torch.Tensor | None, structure: Structure,
              forced_prune: torch.Tensor | None = None,
              layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(keep-mask, new weight or None when the kept weights are unchanged).
        `layer`: the layer's name, for messages."""
        return select_mask(self.score(weight.float(), stat), structure, forced_prune), None

    def reweight(self, weight: torch.Tensor, stat: torch.Tensor | None, keep: torch.Tensor,
                 layer: str | None = None, structure: Structure | None = None) -> torch.Tensor | None:
        """The weight `prune` gives a layer whose mask is `keep`, from `weight` and the
        statistic it pruned with, computed again (bit for bit, on the same machine);
        None when the kept weights are unchanged (W ⊙ keep). Lets a step that stored its
        statistic store no weights (copal.state.StepState.weight). `structure`: the one
        the step pruned under, for a method whose weights depend on how it chose."""
        return None

    def options(self) -> dict:
        """The keyword arguments that build this method again (a step records them to
        recompute its weights)."""
        return {}

    @classmethod
    def from_options(cls, options: dict) -> "Method":
        """The method a step record's `options` name; an override reads older records'."""
        return cls(**options)

    def finish_block(self) -> None:
        """The layer-wise pass finished a block: drop anything kept for its layers."""

    def model_statistic(self, model: nn.Module, batches: list[torch.Tensor], device: torch.device,
                        names: list[str]) -> dict[str, torch.Tensor] | None:
        """The statistic of every named layer from one whole-model computation on
        the calibration batches (methods with `whole_model` set)."""
        raise NotImplementedError

    def combine(self, previous: torch.Tensor | None, fresh: torch.Tensor) -> torch.Tensor:
        """The accumulate regime's C_t from C_{t-1} and this domain's statistic:
        normalised by its scale (each domain weighs the same) and summed."""
        return accumulate(previous, fresh, self._scale(fresh))

    @property
    def compact_state(self) -> bool:
        """Whether the accumulate regime may store the accumulated statistic in a
        compact format (copal.state): a per-weight layer statistic, or a whole-model
        one (COPAL's |∂L/∂W|). Wanda's (in,) and SparseGPT's Hessian stay float32."""
        return self.statistic.per_weight if self.statistic is not None else self.whole_model

    @property
    def symmetric_state(self) -> bool:
        """Whether the accumulated statistic is a symmetric matrix (state.hessian's formats)."""
        return self.statistic is not None and self.statistic.symmetric

    def _scale(self, fresh: torch.Tensor) -> torch.Tensor:
        return (self.statistic or Statistic).scale(fresh)
