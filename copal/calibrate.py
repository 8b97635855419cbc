"""The layer-wise pass (SparseGPT/Wanda procedure) and the loss-gradient statistic.

`prune_layerwise` captures the inputs of block 0 for the calibration batches,
then for each block: load its base weights, run it with hooks that accumulate
the method's statistic, ask the step policy for masks, apply them, and run the
block again to produce the (pruned) inputs of the next block. Only one block,
its activations and its statistics sit on the compute device at a time.

What "base weights", "which statistic" and "forced pruning" mean at a given
step is the regime's business: the pass asks a `LayerPolicy` for each layer.
"""

import logging
from typing import Callable, Protocol

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from copal.methods import Statistic
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


def statistic_hook(statistic: Statistic):
    """A forward hook that feeds a linear layer's (input, output) tokens to `statistic`."""

    def hook(module, args, output):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        y = output.detach().reshape(-1, output.shape[-1]).float()
        statistic.add(x, y)

    return hook


def prune_layerwise(model: nn.Module, batches: list[torch.Tensor], statistic: type[Statistic] | None,
                    policy: LayerPolicy, device: torch.device,
                    progress: Callable[[int, int], None] | None = None) -> None:
    """Prune `model` in place, block by block (see module docstring)."""
    prefix, blocks = find_blocks(model)
    inputs = capture_block_inputs(model, batches, device) if statistic else None
    for index, block in enumerate(blocks):
        linears = {f"{prefix}.{index}.{name}": module for name, module in prunable_linears(block).items()}
        bases = {}
        for name, module in linears.items():
            bases[name] = policy.base_weight(name)
            set_weight_matrix(module, bases[name])
        block.to(device)
        stats = {}
        if statistic:
            handles = []
            for name, module in linears.items():
                stats[name] = statistic(tuple(weight_matrix(module).shape), device)
                handles.append(module.register_forward_hook(statistic_hook(stats[name])))
            try:
                _run_block(block, inputs)
            finally:
                for handle in handles:
                    handle.remove()
        for name, module in linears.items():
            fresh = stats[name].value if name in stats else None
            set_weight_matrix(module, policy.prune_layer(name, bases[name], fresh))
        del stats
        policy.finish_block(index)
        if statistic and index + 1 < len(blocks):
            inputs = _run_block(block, inputs)
        block.to("cpu")
        if progress:
            progress(index + 1, len(blocks))


def loss_gradient_statistic(model: nn.Module, batches: list[torch.Tensor], device: torch.device,
                            names: list[str]) -> dict[str, torch.Tensor]:
    """S_ij = Σ_batches |∂L/∂W_ij| of the language-model loss for the named layers
    (COPAL's `loss` sensitivity): one backward pass through the whole model per
    batch, so the whole model and its gradients sit on `device`."""
    from copal.model import all_prunable

    modules = all_prunable(model)
    model.to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in names:
        modules[name].weight.requires_grad_(True)
    sums = {name: torch.zeros_like(weight_matrix(modules[name]), dtype=torch.float32) for name in names}
    try:
        for batch in batches:
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            for name in names:
                module = modules[name]
                grad = module.weight.grad
                sums[name] += (grad.t() if isinstance(module, Conv1D) else grad).abs().float()
                module.weight.grad = None
    finally:
        for name in names:
            modules[name].weight.requires_grad_(False)
        model.to("cpu")
    return {name: value.cpu() for name, value in sums.items()}
