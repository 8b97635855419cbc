"""The layer-wise pass (SparseGPT/Wanda procedure).

`prune_layerwise` captures the inputs of block 0 for the calibration batches,
then for each block: load its base weights, run it with hooks that accumulate
the method's statistic, ask the step policy for masks, apply them, and run the
block again to produce the (pruned) inputs of the next block. Only one block,
its activations and its statistics sit on the compute device at a time; the
blocks come from a `copal.blocks.BlockSource`, so with a streamed model
(copal.streaming.BlockStream) only one block's weights are in memory at all.

What "base weights", "which statistic" and "forced pruning" mean at a given
step is the regime's business: the pass asks a `LayerPolicy` for each layer.
"""

from typing import Callable, Protocol

import torch
from torch import nn

from copal.blocks import BlockSource, capture_block_inputs, run_block
from copal.methods import LayerInput, Statistic
from copal.model import prunable_linears, set_weight_matrix, weight_matrix

class LayerPolicy(Protocol):
    def base_weight(self, name: str) -> torch.Tensor:
        """The weight (out, in) this step starts from."""

    def prune_layers(self, names: list[str], bases: list[torch.Tensor],
                     fresh: list[torch.Tensor | None]) -> list[torch.Tensor]:
        """Mask layers that read one input (or a single layer) given this step's fresh
        statistics; return their new weights."""

    def finish_block(self, index: int) -> None:
        """Every layer of block `index` is pruned."""


class BlockStatistics:
    """One statistic per linear layer of a block, accumulated by forward hooks
    while the block runs on the calibration batches; masks are computed from
    `values()` afterwards.

    Layers that read the same input tensor (q/k/v, gate/up) share the work:
    what a statistic derives from the input (|X|) is computed once per batch,
    and an input-only statistic (Wanda's Σx², SparseGPT's Hessian) is
    accumulated by the first of those layers and shared with the others. Both
    are the same arithmetic as computing each layer alone, so values are
    bit-identical."""

    def __init__(self, linears: dict[str, nn.Module], statistic: type[Statistic], device: torch.device):
        self.input_only = statistic.input_only
        self.stats = {name: statistic(tuple(weight_matrix(module).shape), device) for name, module in linears.items()}
        self.shares_with: dict[str, str] = {}  # layer → the layer whose input-only statistic it shares
        self._last: tuple[torch.Tensor, str, LayerInput] | None = None  # the latest input and its first reader
        self._handles = [module.register_forward_hook(self._hook(name)) for name, module in linears.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            raw = args[0]
            if self._last is not None and self._last[0] is raw:
                owner, inputs = self._last[1], self._last[2]
            else:
                owner, inputs = name, LayerInput(raw.detach().reshape(-1, raw.shape[-1]).float())
                self._last = (raw, name, inputs)
            if self.input_only and owner != name:
                if self.shares_with.setdefault(name, owner) != owner:
                    raise RuntimeError(f"{name}: reads another layer's input than in the first batch")
                return
            if name in self.shares_with:
                raise RuntimeError(f"{name}: shared {self.shares_with[name]}'s input in an earlier batch only")
            self.stats[name].add(inputs, output.detach().reshape(-1, output.shape[-1]).float())

        return hook

    def values(self) -> dict[str, torch.Tensor]:
        return {name: self.stats[self.shares_with.get(name, name)].value for name in self.stats}

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._last = None


def input_groups(names: list[str], shares: dict[str, str]) -> list[list[str]]:
    """The layers in order, consecutive ones that share an input-only statistic
    (`BlockStatistics.shares_with`: q/k/v, gate/up) grouped together."""
    groups: list[list[str]] = []
    for name in names:
        owner = shares.get(name, name)
        if groups and shares.get(groups[-1][0], groups[-1][0]) == owner:
            groups[-1].append(name)
        else:
            groups.append([name])
    return groups


def prune_layerwise(model: nn.Module, batches: list[torch.Tensor], statistic: type[Statistic] | None,
                    policy: LayerPolicy, device: torch.device, blocks: BlockSource,
                    progress: Callable[[int, int], None] | None = None) -> None:
    """Prune `model` in place, block by block (see module docstring). A streamed
    block's pruned weights live only in what the policy records once it is released."""
    inputs = capture_block_inputs(model, batches, device) if statistic else None
    for index in range(len(blocks.blocks)):
        block = blocks.load(index, device, prunable=False)
        linears = {f"{blocks.prefix}.{index}.{name}": module for name, module in prunable_linears(block).items()}
        bases = {}
        for name, module in linears.items():
            bases[name] = policy.base_weight(name)
            set_weight_matrix(module, bases[name])
        fresh, shares = {}, {}
        if statistic:
            stats = BlockStatistics(linears, statistic, device)
            try:
                run_block(block, inputs)
            finally:
                stats.close()
            fresh, shares = stats.values(), stats.shares_with
            del stats
        for group in input_groups(list(linears), shares):
            weights = policy.prune_layers(group, [bases[name] for name in group], [fresh.get(name) for name in group])
            for name, weight in zip(group, weights):
                set_weight_matrix(linears[name], weight)
        del fresh, bases
        policy.finish_block(index)
        if statistic and index + 1 < len(blocks.blocks):
            inputs, _ = run_block(block, inputs)
        blocks.release(index)
        if progress:
            progress(index + 1, len(blocks.blocks))
