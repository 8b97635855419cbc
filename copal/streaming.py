"""Streaming: the decoder blocks' weights live on disk, not in memory.

Only the non-block tensors (embeddings, final norm, head, rotary tables, the
blocks' buffers) stay resident. A block's parameters are read from the
safetensors files (memory-mapped; sharded checkpoints included) when the
layer-wise pass or the evaluation reaches it, cast to the compute dtype, put
on the compute device, and released afterwards (back to the meta device).

So at any time the model costs its non-block tensors plus one block. The
prunable weights of an evaluated block come from a weight source (the step's
masks over W0, or its reconstructed weights), never from a resident copy.

Evaluation (`streamed_perplexity`) runs block by block over all windows: the
windows are cut into chunks whose hidden states (one copy: windows × seqlen ×
hidden × element size) stay within `HIDDEN_BUDGET_BYTES`; at most two copies
(a block's inputs and outputs) are alive at once, so the bound is
2 × HIDDEN_BUDGET_BYTES plus one batch's activations and logits. Each chunk
reads every block once; a typical evaluation is one chunk.
"""

import logging
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from copal.blocks import capture_block_inputs, run_block
from copal.checkpoint import checkpoint_index, stored_dtype
from copal.errors import InputError
from copal.metrics import add_nll, logits_batch_size
from copal.model import DTYPES, find_blocks, load_model, move_non_block_tensors, prunable_linears, set_weight_matrix

log = logging.getLogger(__name__)

HIDDEN_BUDGET_BYTES = 256 * 2**20

WeightSource = Callable[[str], torch.Tensor]


def block_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str, str]]]:
    """Per block: (module, attribute, full name) of every parameter slot, tied slots included."""
    prefix, blocks = find_blocks(model)
    slots = []
    for index, block in enumerate(blocks):
        entries = []
        for module_name, module in block.named_modules():
            for attr, parameter in module._parameters.items():
                if parameter is not None:
                    name = ".".join(filter(None, (prefix, str(index), module_name, attr)))
                    entries.append((module, attr, name))
        slots.append(entries)
    return slots


def streamable(model: nn.Module, index) -> str | None:
    """Why `model` (a skeleton: meta device is fine) cannot stream from `index`; None if it can."""
    prefix, blocks = find_blocks(model)
    outside = {id(p) for name, p in model.named_parameters(remove_duplicate=False)
               if not name.startswith(prefix + ".")}
    for entries in block_parameters(model):
        for module, attr, name in entries:
            if name not in index:
                return f"{name} not in the checkpoint under that name"
            if id(module._parameters[attr]) in outside:
                return f"{name} is tied to a tensor outside the blocks"
            if tuple(module._parameters[attr].shape) != index[name][2]:
                return f"{name}: shape {tuple(module._parameters[attr].shape)} vs {index[name][2]} in the checkpoint"
    return None


class BlockStream:
    """Loads and releases one decoder block's parameters at a time (a copal.blocks.BlockSource).

    `weights`: where an evaluated block's prunable weights come from (name →
    (out, in) tensor); None means the checkpoint's own (the dense model). Set
    it with `use_weights`."""

    streamed = True

    def __init__(self, model: nn.Module, location: str, dtype: torch.dtype, index=None):
        self.model = model
        self.dtype = dtype
        self.index = index if index is not None else checkpoint_index(Path(location))
        self.prefix, self.blocks = find_blocks(model)
        self.slots = block_parameters(model)
        self.weights: WeightSource | None = None
        for index_ in range(len(self.blocks)):
            self.release(index_)

    def __len__(self) -> int:
        return len(self.blocks)

    def use_weights(self, source: WeightSource | None) -> None:
        """Evaluate with the prunable weights `source` gives from now on (None: the checkpoint's, W0)."""
        self.weights = source

    def load(self, index: int, device: torch.device, prunable: bool = True) -> nn.Module:
        """Block `index` with its parameters on `device` in the compute dtype. With
        `prunable` False its prunable weights are left uninitialised (the caller
        sets them); otherwise they come from `weights` (or the checkpoint)."""
        from safetensors import SafetensorError, safe_open

        block = self.blocks[index]
        linears = {f"{self.prefix}.{index}.{name}": module for name, module in prunable_linears(block).items()}
        skipped = {f"{name}.weight" for name in linears} if (not prunable or self.weights is not None) else set()
        by_file: dict[Path, list[tuple[nn.Module, str, str]]] = {}
        loaded: dict[str, nn.Parameter] = {}
        for module, attr, name in self.slots[index]:
            if name in skipped:
                loaded.setdefault(name, nn.Parameter(torch.empty(self.index[name][2], dtype=self.dtype,
                                                                 device=device), requires_grad=False))
                module._parameters[attr] = loaded[name]
            else:
                by_file.setdefault(self.index[name][0], []).append((module, attr, name))
        for file, entries in by_file.items():
            try:
                with safe_open(str(file), "pt") as handle:
                    for module, attr, name in entries:
                        if name not in loaded:
                            tensor = handle.get_tensor(name).to(device=device, dtype=self.dtype)
                            loaded[name] = nn.Parameter(tensor, requires_grad=False)
                        module._parameters[attr] = loaded[name]
            except (SafetensorError, OSError) as error:
                self.release(index)
                raise InputError(f"{file}: corrupt weights file ({error})") from None
        for module in block.modules():  # buffers (rare in blocks) follow the block
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = buffer.to(device)
        if prunable and self.weights is not None:
            for name, module in linears.items():
                set_weight_matrix(module, self.weights(name))
        return block

    def release(self, index: int) -> None:
        """Block `index`'s parameters back to the meta device, its buffers to the CPU."""
        block = self.blocks[index]
        meta: dict[int, nn.Parameter] = {}
        for module, attr, _ in self.slots[index]:
            parameter = module._parameters[attr]
            if id(parameter) not in meta:
                meta[id(parameter)] = nn.Parameter(torch.empty(parameter.shape, dtype=self.dtype, device="meta"),
                                                   requires_grad=False)
            module._parameters[attr] = meta[id(parameter)]
        for module in block.modules():
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = buffer.to("cpu")


def load_streaming(location: str, dtype: torch.dtype, trust_remote_code: bool = False):
    """(model, BlockStream) with only the non-block tensors materialised, or None
    when the checkpoint cannot stream (not a local safetensors directory, block
    tensors under other names than the model's, a block tensor tied outside)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(location)
    if not folder.is_dir():
        return None
    index = checkpoint_index(folder)
    config = AutoConfig.from_pretrained(location, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    reason = streamable(skeleton, index)
    del skeleton
    if reason is not None:
        log.info("%s: not streaming blocks (%s); the whole model stays resident", location, reason)
        return None
    stored = stored_dtype(index) or dtype
    # Loaded in its stored dtype, transformers maps the files: nothing is read
    # until touched, and the blocks are released before anything touches them.
    model, tokenizer = load_model(location, _dtype_name(stored), trust_remote_code)
    stream = BlockStream(model, location, dtype, index)
    if stored != dtype:
        _cast_non_block(model, stream.blocks, dtype)
    return model, tokenizer, stream


def _dtype_name(dtype: torch.dtype) -> str:
    return next((name for name, value in DTYPES.items() if value == dtype), "float32")


def _cast_non_block(model: nn.Module, blocks: nn.ModuleList, dtype: torch.dtype) -> None:
    """Every floating non-block parameter to `dtype` (tied ones stay tied: a Parameter is cast once)."""
    in_blocks = {id(p) for p in blocks.parameters()}
    done = set()
    for module in model.modules():
        for parameter in module._parameters.values():
            if parameter is None or id(parameter) in in_blocks or id(parameter) in done:
                continue
            done.add(id(parameter))
            if parameter.is_floating_point():
                parameter.data = parameter.data.to(dtype)


# ---------------------------------------------------------------------------- evaluation


@contextmanager
def _blocks_replaced(blocks: nn.ModuleList, finals: list[torch.Tensor], as_tuple: bool):
    """Every block's forward skipped: the blocks pass their input on, and the last one
    returns the precomputed final hidden state of each successive call."""
    calls = iter(finals)

    def passthrough(*args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        return (hidden,) if as_tuple else hidden

    def last(*args, **kwargs):
        hidden = next(calls)
        return (hidden,) if as_tuple else hidden

    for block in blocks:
        block.forward = passthrough
    blocks[-1].forward = last
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


def run_blocks(stream: BlockStream, inputs, device: torch.device) -> tuple[list, bool]:
    """Every block, loaded in turn, over `inputs` (block 0's captured calls)."""
    as_tuple = False
    for index in range(len(stream)):
        block = stream.load(index, device)
        try:
            inputs, as_tuple = run_block(block, inputs)
        finally:
            stream.release(index)
    return inputs, as_tuple


def streamed_logits(model: nn.Module, stream: BlockStream, batches: list[torch.Tensor], device: torch.device):
    """Yield (batch, logits) for each batch, the blocks streamed once over all of them."""
    inputs = capture_block_inputs(model, batches, device)
    outputs, as_tuple = run_blocks(stream, inputs, device)
    finals = [args[0] for args, _ in outputs]
    del inputs, outputs
    move_non_block_tensors(model, stream.blocks, device)
    try:
        with torch.no_grad(), _blocks_replaced(stream.blocks, finals, as_tuple):
            for batch in batches:
                batch = batch.to(device)
                yield batch, model(input_ids=batch, use_cache=False).logits
    finally:
        move_non_block_tensors(model, stream.blocks, torch.device("cpu"))


def chunk_windows(model: nn.Module, windows: torch.Tensor, batch_size: int, dtype: torch.dtype) -> int:
    """Windows per chunk: a multiple of the batch size whose hidden states fit HIDDEN_BUDGET_BYTES."""
    hidden = getattr(model.config, "hidden_size", None) or model.get_input_embeddings().weight.shape[1]
    per_window = windows.shape[1] * hidden * torch.empty((), dtype=dtype).element_size()
    return max(1, HIDDEN_BUDGET_BYTES // (per_window * batch_size)) * batch_size


def streamed_perplexity(model: nn.Module, stream: BlockStream, windows: torch.Tensor, device: torch.device,
                        batch_size: int = 8) -> tuple[float, int]:
    """copal.metrics.perplexity with the blocks read from disk one at a time, each run
    over a chunk of windows (the same batches, so the same arithmetic)."""
    batch_size = logits_batch_size(model, windows, batch_size)
    total_nll, total_tokens = 0.0, 0
    chunk = chunk_windows(model, windows, batch_size, stream.dtype)
    for start in range(0, len(windows), chunk):
        batches = list(windows[start : start + chunk].split(batch_size))
        for batch, logits in streamed_logits(model, stream, batches, device):
            total_nll = add_nll(total_nll, logits, batch)
            total_tokens += batch[:, 1:].numel()
            del logits
    return math.exp(total_nll / total_tokens), total_tokens
