"""Masks from scores: unstructured (per row or per layer) and N:M; bit-packing.

A mask is a bool tensor shaped like the weight in (out, in) orientation, True
where the weight is kept.
"""

from dataclasses import dataclass

import numpy as np
import torch

from copal.errors import InputError


# The structures a config may name: unstructured (at any sparsity), or N:M (N of every
# M consecutive inputs kept, at sparsity 1 - N/M), the patterns sparse tensor cores run.
STRUCTURES = ("unstructured", "2:4", "4:8")


def parse_structure(name: str) -> tuple[int, int] | None:
    """A structure's (N, M), None for unstructured."""
    if name == "unstructured":
        return None
    n, m = name.split(":")
    return int(n), int(m)


@dataclass(frozen=True)
class Structure:
    sparsity: float
    n_m: tuple[int, int] | None = None  # None = unstructured
    scope: str = "row"  # unstructured only: "row" or "layer"
    # unstructured only: exactly this many of the layer's weights pruned (a sparsity
    # profile's allocation, copal.profiles), spread over the rows by `row_counts` in
    # row scope; None: round(sparsity · in) per row, round(sparsity · size) per layer
    pruned: int | None = None

    def pruned_per_row(self, in_features: int) -> int:
        return int(round(self.sparsity * in_features))

    def describe(self) -> str:
        return f"{self.n_m[0]}:{self.n_m[1]}" if self.n_m else f"{self.sparsity:.0%} unstructured"


def row_counts(pruned: int, rows: int, cols: int) -> torch.Tensor:
    """A layer's `pruned` count over its rows: ⌊pruned/rows⌋ each, one more for the
    first pruned mod rows rows (so the rows differ by at most one weight)."""
    if not 0 <= pruned <= rows * cols:
        raise ValueError(f"cannot prune {pruned} of {rows} × {cols} weights")
    counts = torch.full((rows,), pruned // rows, dtype=torch.long)
    counts[: pruned % rows] += 1
    return counts


def drop_lowest_per_row(score: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """drop_lowest with its own count for each row (`counts`, (rows,)): rows grouped by count."""
    keep = torch.empty(score.shape, dtype=torch.bool, device=score.device)
    for count in counts.unique().tolist():
        chosen = (counts == count).to(score.device)
        keep[chosen] = drop_lowest(score[chosen], count)
    return keep


def check_fits(structure: Structure, name: str, shape: tuple[int, int]) -> None:
    if structure.n_m and shape[1] % structure.n_m[1]:
        raise InputError(f"layer {name}: {shape[1]} inputs are not divisible into groups of {structure.n_m[1]}")


def _kth_and_next(score: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k-th and (k+1)-th smallest values (1-based) along the last dimension,
    keepdim: exactly what a sort would put there. On the CPU numpy's
    introselect (`np.partition`) is several times faster than torch's
    `kthvalue`."""
    if score.device.type != "cpu":
        return (score.kthvalue(k, dim=-1, keepdim=True).values, score.kthvalue(k + 1, dim=-1, keepdim=True).values)
    partitioned = np.partition(score.detach().numpy(), k - 1, axis=-1)  # [..., k:] holds the larger values
    return (torch.from_numpy(partitioned[..., k - 1:k]),
            torch.from_numpy(partitioned[..., k:].min(axis=-1, keepdims=True)))


def _drop_lowest_of_few(score: torch.Tensor, count: int) -> torch.Tensor:
    """drop_lowest for a last dimension of at most 4 (2:4 groups): each score's place
    in the stable ascending sort from its pairwise comparisons (6 for 4 values), the
    first `count` dropped. Several times faster than selecting per group, which
    matters because SparseGPT chooses a 2:4 mask every 4 columns."""
    values = score.detach().numpy()
    place = np.zeros(values.shape, dtype=np.int8)
    width = values.shape[-1]
    for left in range(width):
        for right in range(left + 1, width):
            right_first = values[..., left] > values[..., right]  # a tie keeps the left one first
            place[..., left] += right_first
            place[..., right] += ~right_first
    return torch.from_numpy(place >= count)


def drop_lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Keep-mask that drops the `count` lowest scores along the last dimension.

    Selection, not a sort: the count-th smallest score is the threshold and
    everything up to it is dropped. Where the threshold value also sits just
    above it (a tie straddles the boundary), the tied scores are dropped from
    the left until `count` are gone. That is exactly what a stable ascending
    sort would drop (ties break by index, the same way every time), at a
    fraction of the cost. Quantised weights tie often, so the tie rule matters."""
    if count <= 0:
        return torch.ones_like(score, dtype=torch.bool)
    if count >= score.shape[-1]:
        return torch.zeros_like(score, dtype=torch.bool)
    if score.shape[-1] <= 4 and score.device.type == "cpu":
        return _drop_lowest_of_few(score, count)
    threshold, above = _kth_and_next(score, count)
    drop = score <= threshold
    straddling = (above == threshold).squeeze(-1)
    if straddling.any():
        rows, row_threshold = score[straddling], threshold[straddling]
        below, tied = rows < row_threshold, rows == row_threshold
        tied_to_drop = count - below.sum(-1, keepdim=True)
        drop[straddling] = below | (tied & (tied.cumsum(-1) <= tied_to_drop))
    return ~drop


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
        return drop_lowest(grouped, m - n).reshape(rows, cols)
    if structure.scope == "layer":
        count = structure.pruned if structure.pruned is not None else int(round(structure.sparsity * score.numel()))
        return drop_lowest(score.reshape(1, -1), count).reshape(rows, cols)
    if structure.pruned is not None:
        return drop_lowest_per_row(score, row_counts(structure.pruned, rows, cols))
    return drop_lowest(score, structure.pruned_per_row(cols))


def pack(bits: torch.Tensor) -> torch.Tensor:
    """Bit-pack a bool (or 0/1) tensor into uint8, 8 to a byte, the first in the high bit
    (numpy's packbits), on the tensor's device: a GPU's mask crosses to the CPU 8x smaller."""
    flat = bits.reshape(-1).to(torch.bool)
    if flat.device.type == "cpu":
        return torch.from_numpy(np.packbits(flat.numpy()))
    first_high = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=flat.device)
    padded = torch.nn.functional.pad(flat.to(torch.uint8), (0, -flat.numel() % 8))
    return (padded.reshape(-1, 8) * first_high).sum(1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    count = int(np.prod(shape))
    bits = np.unpackbits(packed.numpy(), count=count)
    return torch.from_numpy(bits.astype(bool)).reshape(shape)
