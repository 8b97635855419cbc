"""The layer-wise pass (SparseGPT/Wanda procedure).

`prune_layerwise` captures the inputs of block 0 for the calibration batches,
then for each block: load its base weights, run it with hooks that accumulate
the method's statistic, ask the step policy for masks, apply them, and run the
block again to produce the (pruned) inputs of the next block. Only one block,
its activations and its statistics sit on the compute device at a time; with
a `copal.streaming.BlockStream` only one block's weights are in memory at all.

What "base weights", "which statistic" and "forced pruning" mean at a given
step is the regime's business: the pass asks a `LayerPolicy` for each layer.
"""

import logging
from typing import Callable, Protocol

import torch
from torch import nn

from copal.methods import LayerInput, Statistic
from copal.model import find_blocks, move_non_block_tensors, prunable_linears, set_weight_matrix, weight_matrix

log = logging.getLogger(__name__)


class LayerPolicy(Protocol):
    def base_weight(self, name: str) -> torch.Tensor:
        """The weight (out, in) this step starts from."""

    def prune_layer(self, name: str, base: torch.Tensor, fresh: torch.Tensor | None) -> torch.Tensor:
        """Mask the layer given this step's fresh statistic; return the new weight."""

    def finish_block(self, index: int) -> None:
        """Every layer of block `index` is pruned."""


class _StopForward(Exception):
    pass


def capture_block_inputs(model: nn.Module, batches: list[torch.Tensor], device: torch.device):
    """Run the model up to block 0 for each batch; return [(args, kwargs)] of block 0's calls."""
    _, blocks = find_blocks(model)
    captured = []

    def catch(module, args, kwargs):
        captured.append((args, kwargs))
        raise _StopForward

    move_non_block_tensors(model, blocks, device)
    handle = blocks[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
        move_non_block_tensors(model, blocks, torch.device("cpu"))
    if len(captured) != len(batches):
        raise RuntimeError("the model's forward did not reach its first decoder block")
    return captured


def _run_block(block: nn.Module, inputs) -> list:
    """Run a block on every captured batch; return the next block's inputs."""
    outputs = []
    with torch.no_grad():
        for args, kwargs in inputs:
            out = block(*args, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
            outputs.append(((hidden,) + tuple(args[1:]), kwargs))
    return outputs


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


def prune_layerwise(model: nn.Module, batches: list[torch.Tensor], statistic: type[Statistic] | None,
                    policy: LayerPolicy, device: torch.device,
                    progress: Callable[[int, int], None] | None = None, stream=None) -> None:
    """Prune `model` in place, block by block (see module docstring). With a
    `stream` (copal.streaming.BlockStream) each block's parameters are read from
    disk when its turn comes and released after it; the pruned weights then
    live only in what the policy records."""
    prefix, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, batches, device) if statistic else None
    for index in range(len(blocks)):
        block = stream.load(index, device, prunable=False) if stream is not None else blocks[index]
        linears = {f"{prefix}.{index}.{name}": module for name, module in prunable_linears(block).items()}
        bases = {}
        for name, module in linears.items():
            bases[name] = policy.base_weight(name)
            set_weight_matrix(module, bases[name])
        block.to(device)
        fresh = {}
        if statistic:
            stats = BlockStatistics(linears, statistic, device)
            try:
                _run_block(block, inputs)
            finally:
                stats.close()
            fresh = stats.values()
            del stats
        for name, module in linears.items():
            set_weight_matrix(module, policy.prune_layer(name, bases[name], fresh.get(name)))
        del fresh, bases
        policy.finish_block(index)
        if statistic and index + 1 < len(blocks):
            inputs = _run_block(block, inputs)
        if stream is not None:
            stream.release(index)
        else:
            block.to("cpu")
        if progress:
            progress(index + 1, len(blocks))
