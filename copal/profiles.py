"""A step's sparsity per layer (the config's `sparsity_profile`).

`uniform`: every layer at the configured structure. `owl`: OWL's layer-wise
sparsity (copal.owl), allocated afresh at each step from the outlier ratios of
the blocks' Wanda scores |W| · ‖x‖ with the step's base weights, before its
layer-wise pass prunes anything (OWL needs every block's ratio first).

‖x‖² comes from Σx², the input energy of every prunable layer, measured by a
forward pass over the step's calibration batches through the step's base weights
(`owl_counts`: the layer-wise pass with nothing pruned) and divided by the
tokens it summed over, so that each domain weighs the same while the layers of
a block keep the scales OWL's block ratio compares. Under a regime that records
state (accumulate) it is added to the parent step's and recorded with the step
(copal.state.StepWriter.energy): OWL's allocation then follows every domain seen
so far, as the pruning statistic does, without keeping any past data.
"""

import math

import torch
from pydantic import Field
from torch import nn

from copal.blocks import BlockSource
from copal.calibrate import prune_layerwise
from copal.masks import Structure
from copal.methods.wanda import InputEnergy
from copal.options import Strict
from copal.owl import allocate, block_ratio, check_options, check_structure


class OWLOptions(Strict):
    """The config's `owl:` section (used with `sparsity_profile: owl`): OWL's λ, the
    largest change of a block's sparsity from the target, and M, the multiple of
    the mean score above which a score is an outlier (the paper's defaults)."""

    lam: float = Field(0.08, ge=0, description="λ: block sparsities within target ± λ")
    m: float = Field(5.0, gt=0, description="M: outliers are scores above M × the block's mean")


class Uniform:
    """Every layer at the configured structure."""

    def __init__(self, structure: Structure):
        self.base = structure

    def structure(self, names: list[str], shapes: list[tuple[int, int]]) -> Structure:
        return self.base


class LayerCounts:
    """Each layer pruned exactly its allocated count. Layers pruned as one matrix of
    stacked rows (q/k/v, gate/up: copal.step) prune their counts' sum, spread evenly
    over all their rows: the total stays exact, each layer within a weight per row
    of its own count."""

    def __init__(self, structure: Structure, pruned: dict[str, int]):
        self.base, self.pruned = structure, pruned

    def structure(self, names: list[str], shapes: list[tuple[int, int]]) -> Structure:
        pruned = sum(self.pruned[name] for name in names)
        size = sum(math.prod(shape) for shape in shapes)
        return Structure(pruned / size, scope=self.base.scope, pruned=pruned)


class _EnergyPass:
    """A LayerPolicy that prunes nothing: it keeps each layer's Σx² per token (plus the
    parent's, `previous`) and, at the end of each block, the block's outlier ratio."""

    def __init__(self, base_weight, previous, tokens: int, options: OWLOptions, prefix: str):
        self.base_weight, self.previous, self.tokens = base_weight, previous, tokens
        self.options, self.prefix = options, prefix
        self.energy: dict[str, torch.Tensor] = {}
        self.ratios: dict[str, float] = {}
        self.shapes: dict[str, dict[str, tuple[int, int]]] = {}
        self._block: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def prune_layers(self, names, bases, fresh):
        for name, base, energy in zip(names, bases, fresh):
            energy = energy.float().cpu() / self.tokens
            previous = self.previous(name)
            if previous is not None:
                energy = previous + energy
            self.energy[name] = energy
            self._block[name] = (base, energy)
        return bases

    def finish_block(self, index: int) -> None:
        block = f"{self.prefix}.{index}"
        self.ratios[block] = block_ratio({name: (weight, energy.to(weight.device))
                                          for name, (weight, energy) in self._block.items()}, self.options.m)
        self.shapes[block] = {name: tuple(weight.shape) for name, (weight, _) in self._block.items()}
        self._block = {}


def owl_counts(options: OWLOptions, structure: Structure, model: nn.Module, batches: list[torch.Tensor],
               base_weight, previous, device: torch.device, blocks: BlockSource) -> tuple[LayerCounts, dict]:
    """OWL's allocation for one step, and the Σx² per token it used ({layer: (in,)}):
    `base_weight(name)` the step's base weight, `previous(name)` the parent's recorded
    energy or None."""
    check_structure(structure)
    check_options(structure.sparsity, options.lam, options.m)
    tokens = sum(batch.numel() for batch in batches)
    energy = _EnergyPass(base_weight, previous, tokens, options, blocks.prefix)
    prune_layerwise(model, batches, InputEnergy, energy, device, blocks)
    profile = allocate(energy.ratios, energy.shapes, structure.sparsity, options.lam)
    return LayerCounts(structure, profile.pruned), energy.energy
