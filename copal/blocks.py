"""Running a model one decoder block at a time: block 0's inputs captured, a
block run over them, and where a block's parameters come from.

A `BlockSource` hands the layer-wise pass and the evaluation one block at a
time on the compute device and takes it back afterwards: `ResidentBlocks` for
a model held in memory, `copal.streaming.BlockStream` for one whose blocks are
read from the checkpoint when their turn comes."""

from typing import Protocol

import torch
from torch import nn

from copal.model import find_blocks, move_non_block_tensors


class BlockSource(Protocol):
    prefix: str
    blocks: nn.ModuleList
    streamed: bool

    def load(self, index: int, device: torch.device, prunable: bool = True) -> nn.Module:
        """Block `index` on `device`. With `prunable` False its prunable weights may be
        left uninitialised: the caller sets them."""

    def release(self, index: int) -> None:
        """Block `index` off the compute device."""


class ResidentBlocks:
    """The blocks of a model held in memory (on the CPU between turns)."""

    streamed = False

    def __init__(self, model: nn.Module):
        self.prefix, self.blocks = find_blocks(model)

    def __len__(self) -> int:
        return len(self.blocks)

    def load(self, index: int, device: torch.device, prunable: bool = True) -> nn.Module:
        return self.blocks[index].to(device)

    def release(self, index: int) -> None:
        self.blocks[index].to("cpu")


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


def run_block(block: nn.Module, inputs) -> tuple[list, bool]:
    """The block on every captured call: (the next block's inputs, whether the block returns a tuple)."""
    outputs, as_tuple = [], False
    with torch.no_grad():
        for args, kwargs in inputs:
            out = block(*args, **kwargs)
            as_tuple = isinstance(out, tuple)
            hidden = out[0] if as_tuple else out
            outputs.append(((hidden,) + tuple(args[1:]), kwargs))
    return outputs, as_tuple
