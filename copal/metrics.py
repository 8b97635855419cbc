"""Perplexity (SparseGPT/Wanda protocol), the PPL matrix summaries, realised sparsity."""

import math
import os
import resource

import torch
from torch import nn


def perplexity(model: nn.Module, windows: torch.Tensor, device: torch.device, batch_size: int = 8) -> tuple[float, int]:
    """exp(mean NLL) over every predicted token of the windows → (ppl, predicted tokens).

    Each window of `seqlen` tokens predicts its tokens 2..seqlen from the ones
    before (no context crosses windows)."""
    model.to(device)
    total_nll, total_tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                              reduction="sum")
            total_nll += float(nll)
            total_tokens += targets.numel()
    model.to("cpu")
    return math.exp(total_nll / total_tokens), total_tokens


def bwt(ppl: list[list[float | None]]) -> float | None:
    """Backward transfer after the last step T (lower is better):
    1/(T-1) Σ_{i<T} (P[T][i] − P[i][i]), rows = steps 1..T, column i = domain of step i."""
    steps = len(ppl)
    if steps < 2:
        return None
    last = ppl[-1]
    return sum(last[i] - ppl[i][i] for i in range(steps - 1)) / (steps - 1)


def average_ppl(ppl: list[list[float | None]]) -> float | None:
    """Mean PPL of the last step's model over the domains seen so far (1..T)."""
    if not ppl:
        return None
    seen = ppl[-1][: len(ppl)]
    return sum(seen) / len(seen)


def layer_sparsity(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: 1.0 - mask.float().mean().item() for name, mask in masks.items()}


def overall_sparsity(masks: dict[str, torch.Tensor]) -> float:
    kept = sum(int(mask.sum()) for mask in masks.values())
    total = sum(mask.numel() for mask in masks.values())
    return 1.0 - kept / total


class PeakMemory:
    """Peak resident memory (MB) of this process over a stretch of work.

    Linux keeps the high-water mark in /proc/self/status (VmHWM); writing "5" to
    /proc/self/clear_refs resets it, so each step gets its own peak. Elsewhere
    we fall back to the lifetime peak from getrusage."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
        except OSError:
            pass
        return self

    def __exit__(self, *exc):
        return False

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
