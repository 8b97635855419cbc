"""Perplexity (SparseGPT/Wanda protocol), the PPL matrix summaries, realised sparsity."""

import math
import os
import resource

import torch
from torch import nn


# Upper bound on the logits one forward pass may produce: with a 32k vocabulary
# a single 256-token window already has 33 MB of logits.
_LOGITS_BUDGET_BYTES = 64 * 2**20


def logits_batch_size(model: nn.Module, windows: torch.Tensor, batch_size: int) -> int:
    """`batch_size` shrunk so that a batch's logits stay within a fixed memory budget whatever the vocabulary."""
    vocab = model.get_output_embeddings().weight.shape[0]
    per_window = windows.shape[1] * vocab * 4
    return max(1, min(batch_size, _LOGITS_BUDGET_BYTES // per_window))


def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 8) -> tuple[float, int]:
    """exp(mean NLL) over every predicted token of the windows → (ppl, predicted tokens),
    the model resident and run batch by batch (copal.streaming.streamed_perplexity: the
    same arithmetic with its blocks streamed).

    Each window of `seqlen` tokens predicts its tokens 2..seqlen from the ones
    before (no context crosses windows)."""
    batch_size = logits_batch_size(model, windows, batch_size)
    total_nll, total_tokens = 0.0, 0
    model.to(device)
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits
            total_nll = add_nll(total_nll, logits, batch)
            total_tokens += batch[:, 1:].numel()
            del logits
    model.to("cpu")
    return math.exp(total_nll / total_tokens), total_tokens


def add_nll(total: float, logits: torch.Tensor, batch: torch.Tensor) -> float:
    """`total` plus the NLL of each row of a batch, row by row (no copy of the whole batch's logits)."""
    for row in range(len(batch)):
        total += float(nn.functional.cross_entropy(logits[row, :-1].float(), batch[row, 1:], reduction="sum"))
    return total


def bwt(ppl: list[list[float | None]], step_columns: list[int]) -> float | None:
    """Backward transfer after the last step T (lower is better):
    1/(T-1) Σ_{i<T} (P[T][d_i] − P[i][d_i]), d_i the domain of step i."""
    steps = len(ppl)
    if steps < 2:
        return None
    last = ppl[-1]
    return sum(last[column] - ppl[i][column] for i, column in enumerate(step_columns[:-1])) / (steps - 1)


def average_ppl(ppl: list[list[float | None]], step_columns: list[int]) -> float | None:
    """Mean PPL of the last step's model over the domains its lineage has seen."""
    if not ppl:
        return None
    seen = sorted(set(step_columns))
    return sum(ppl[-1][column] for column in seen) / len(seen)


class PeakMemory:
    """Peak resident memory (MB) of this process from construction on.

    Linux keeps the high-water mark in /proc/self/status (VmHWM); writing "5" to
    /proc/self/clear_refs resets it, so each step gets its own peak. Elsewhere
    we fall back to the lifetime peak from getrusage."""

    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            pass

    @property
    def peak_mb(self) -> float:
        try:
            with open(f"/proc/{os.getpid()}/status") as status:
                for line in status:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
