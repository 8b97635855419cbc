"""Masks from scores: unstructured (per row or per layer) and N:M; bit-packing.

A mask is a bool tensor shaped like the weight in (out, in) orientation, True
where the weight is kept.
"""

from dataclasses import dataclass

import numpy as np
import torch

from copal.errors import InputError


@dataclass(frozen=True)
class Structure:
    sparsity: float
    n_m: tuple[int, int] | None = None  # None = unstructured
    scope: str = "row"  # unstructured only: "row" or "layer"

    def pruned_per_row(self, in_features: int) -> int:
        return int(round(self.sparsity * in_features))

    def describe(self) -> str:
        return f"{self.n_m[0]}:{self.n_m[1]}" if self.n_m else f"{self.sparsity:.0%} unstructured"


def check_fits(structure: Structure, name: str, shape: tuple[int, int]) -> None:
    if structure.n_m and shape[1] % structure.n_m[1]:
        raise InputError(f"layer {name}: {shape[1]} inputs are not divisible into groups of {structure.n_m[1]}")


def _prune_lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask that drops the `count` lowest scores along the last dimension.
    A stable sort makes ties (e.g. many zeros) break the same way every time."""
    order = torch.argsort(score, dim=-1, stable=True)
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(-1, order[..., :count], False)
    return keep


def select_mask(score: torch.Tensor, structure: Structure, forced_prune: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the highest scores under `structure`; `forced_prune` positions are
    always pruned (the `sequential` regime uses it so nothing pruned comes back)."""
    score = score.float()
    if forced_prune is not None:
        score = score.masked_fill(forced_prune, float("-inf"))
    rows, cols = score.shape
    if structure.n_m:
        n, m = structure.n_m
        grouped = score.reshape(rows, cols // m, m)
        return _prune_lowest(grouped, m - n).reshape(rows, cols)
    if structure.scope == "layer":
        flat = _prune_lowest(score.reshape(1, -1), int(round(structure.sparsity * score.numel())))
        return flat.reshape(rows, cols)
    return _prune_lowest(score, structure.pruned_per_row(cols))


def pack(mask: torch.Tensor) -> torch.Tensor:
    """Bit-pack a bool mask into uint8 (8 weights a byte)."""
    return torch.from_numpy(np.packbits(mask.cpu().numpy().reshape(-1)))


def unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    count = int(np.prod(shape))
    bits = np.unpackbits(packed.numpy(), count=count)
    return torch.from_numpy(bits.astype(bool)).reshape(shape)
