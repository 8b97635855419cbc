"""One continual pruning step, in place on a model: `prune_step`.

It reads only what it is given (the model, the calibration batches, the method,
the regime, the dense weights, the parent step's recorded state) and writes the
step's masks, accumulated statistic and reconstructed weights into a
`StepWriter`; nothing here knows about run directories.

The device boundary: everything a step combines (W0 or the parent's weight, the
parent's mask and accumulated statistic, the fresh statistic) reaches the
compute device through `StepPolicy` (`DenseOnDevice`, `StepOnDevice`); what a
step records leaves it in one place, the `StepWriter` (copal.state).
"""

from typing import Callable

import torch
from torch import nn

from copal.blocks import BlockSource
from copal.calibrate import prune_layerwise
from copal.masks import Structure, check_fits
from copal.methods import Method
from copal.model import DenseWeights, all_prunable, set_weight_matrix
from copal.profiles import LayerCounts, OWLOptions, Uniform, owl_counts
from copal.regimes import Regime
from copal.state import StepState, StepWriter


class DenseOnDevice:
    """W0 (copal.model.DenseWeights) read onto the compute device."""

    def __init__(self, dense: DenseWeights, device: torch.device):
        self.dense, self.device = dense, device

    def get(self, name: str) -> torch.Tensor:
        return self.dense.get(name).to(self.device)


class StepOnDevice:
    """A recorded step (copal.state.StepState) whose tensors are read onto the compute device:
    what the regimes ask of the parent step."""

    def __init__(self, state: StepState, device: torch.device):
        self.state, self.device = state, device

    @property
    def id(self) -> int:
        return self.state.id

    def mask(self, name: str) -> torch.Tensor:
        return self.state.mask(name).to(self.device)

    def sensitivity(self, name: str) -> torch.Tensor | None:
        value = self.state.sensitivity(name)
        return None if value is None else value.to(self.device)

    def state_format(self, name: str) -> str | None:
        return self.state.state_format(name)

    def weight(self, name: str, dense: DenseOnDevice) -> torch.Tensor:
        return self.state.weight(name, dense).to(self.device)


class StepPolicy:
    """The layer-wise pass's questions for one step (copal.calibrate.LayerPolicy),
    answered by the regime and the method; masks, statistics and new weights go
    to the step's writer."""

    def __init__(self, method: Method, regime: Regime, structure: Structure, dense: DenseWeights,
                 parent: StepState | None, writer: StepWriter, device: torch.device,
                 precomputed: dict[str, torch.Tensor] | None = None):
        self.method = method
        self.regime = regime
        self.structure = structure
        self.layers: Uniform | LayerCounts = Uniform(structure)  # each layer's structure (copal.profiles)
        self.device = device
        self.dense = DenseOnDevice(dense, device)
        self.parent = StepOnDevice(parent, device) if parent is not None else None
        self.writer = writer
        self.precomputed = precomputed  # the method's whole-model statistic, if it has one

    def base_weight(self, name: str) -> torch.Tensor:
        return self.regime.base_weight(name, self.dense, self.parent)

    def prune_layers(self, names: list[str], bases: list[torch.Tensor],
                     fresh: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Layers that read one input (copal.calibrate.input_groups). An input-only
        statistic they share is combined and recorded once (`Regime.share_statistic`).
        Where the method prunes rows independently (`Method.stacks_rows`) and the layers
        share that one statistic, they are pruned as one matrix, their rows stacked: the
        same arithmetic per row, one pass of the method's loop instead of one per layer."""
        if self.precomputed is not None:
            return [self.prune_layer(name, base, stat) for name, base, stat in zip(names, bases, fresh)]
        for name, base in zip(names, bases):
            check_fits(self.structure, name, tuple(base.shape))
        stats = self._statistics(names, fresh)
        forced = [self.regime.forced_prune(name, self.parent) for name in names]
        stacked = (len(names) > 1 and self.method.stacks_rows and self.structure.scope != "layer"
                   and all(stat is stats[0] for stat in stats[1:]))
        if not stacked:
            return [self._apply(*layer) for layer in zip(names, bases, stats, forced)]
        rows = [base.shape[0] for base in bases]
        both = None if all(f is None for f in forced) else torch.cat(
            [f if f is not None else torch.zeros_like(b, dtype=torch.bool) for f, b in zip(forced, bases)])
        structure = self.layers.structure(names, [tuple(base.shape) for base in bases])
        mask, weight = self.method.prune(torch.cat(bases), stats[0], structure, both, layer=names[0])
        masks = mask.split(rows)
        # clones: a step's files must not hold views of one storage
        weights = [part.clone() for part in weight.split(rows)] if weight is not None else [None] * len(names)
        return [self._record(*layer) for layer in zip(names, bases, masks, weights)]

    def _statistics(self, names: list[str], fresh: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """The statistic each layer's score uses; one shared input-only statistic
        (the same fresh tensor for every layer) is combined once."""
        if len(names) > 1 and fresh[0] is not None and all(stat is fresh[0] for stat in fresh[1:]):
            shared = self.regime.statistic(names[0], fresh[0], self.method, self.parent, self.writer)
            self.regime.share_statistic(names[1:], names[0], self.writer)
            return [shared] * len(names)
        return [self.regime.statistic(name, stat, self.method, self.parent, self.writer)
                for name, stat in zip(names, fresh)]

    def prune_layer(self, name: str, base: torch.Tensor, fresh: torch.Tensor | None) -> torch.Tensor:
        check_fits(self.structure, name, tuple(base.shape))
        if self.precomputed is not None:
            fresh = self.precomputed.pop(name).to(self.device)
        stat = self.regime.statistic(name, fresh, self.method, self.parent, self.writer)
        return self._apply(name, base, stat, self.regime.forced_prune(name, self.parent))

    def _apply(self, name: str, base: torch.Tensor, stat: torch.Tensor | None,
               forced: torch.Tensor | None) -> torch.Tensor:
        structure = self.layers.structure([name], [tuple(base.shape)])
        mask, new_weight = self.method.prune(base, stat, structure, forced, layer=name)
        return self._record(name, base, mask, new_weight)

    def _record(self, name: str, base: torch.Tensor, mask: torch.Tensor,
                new_weight: torch.Tensor | None) -> torch.Tensor:
        """The layer's mask and new weight into the step's writer; the weight it ends with."""
        if new_weight is not None:
            new_weight = new_weight.to(base.dtype)
            self.writer.weights.add(name, new_weight)
        else:
            new_weight = base * mask.to(base.device, base.dtype)
        self.writer.add_mask(name, mask, new_weight)  # sparsity: the zeros of the weight the layer ends with
        return new_weight

    def finish_block(self, index: int) -> None:
        self.method.finish_block()
        self.writer.finish_block(index)


def prune_step(model: nn.Module, batches: list[torch.Tensor], method: Method, regime: Regime,
               structure: Structure, dense: DenseWeights, parent: StepState | None, writer: StepWriter,
               device: torch.device, blocks: BlockSource, progress: Callable[[int, int], None] | None = None,
               owl: OWLOptions | None = None) -> None:
    """Prune `model` in place for one step: calibration `batches` (the regime chose
    their domains), `parent` the step it continues from (None: the first), the
    model's `blocks` resident or streamed (copal.blocks); a method with a
    whole-model statistic needs them resident. `owl`: allocate the sparsity per
    layer by OWL (copal.profiles) instead of uniformly."""
    if method.whole_model and blocks.streamed:
        raise ValueError(f"{type(method).__name__}: a whole-model statistic needs the resident model, not a stream")
    policy = StepPolicy(method, regime, structure, dense, parent, writer, device)
    if owl is not None:
        previous = parent.energy if parent is not None and regime.records_state else (lambda name: None)
        policy.layers, energy = owl_counts(owl, structure, model, batches, policy.base_weight, previous, device,
                                           blocks)
        if regime.records_state:
            writer.energy = energy
    if method.whole_model:  # its statistic sees the whole model with the step's base weights
        modules = all_prunable(model)
        for name, module in modules.items():
            set_weight_matrix(module, policy.base_weight(name))
        policy.precomputed = method.model_statistic(model, batches, device, list(modules))
    prune_layerwise(model, batches, method.statistic, policy, device, blocks, progress)
