"""OWL layer-wise sparsity (Yin et al., ICML 2024, "Outlier Weighed Layerwise Sparsity").

Blocks whose Wanda scores A_ij = |W_ij| · ‖X_j‖₂ hold more outliers matter more,
so they are pruned less. From the paper:

* a block's outlier ratio is the fraction of its scores (all its linear layers
  together) above M times their mean;
* block sparsities follow the ratios linearly, the most outlier-heavy block at
  target − λ and the least at target + λ, shifted so that the model's average
  sparsity is the target.

Here the shift is found with the sparsities clipped to [target − λ, target + λ]
(so the bounds hold whatever the ratios' distribution), and the result is made
integer: each layer gets a count of weights to prune, all counts adding up to
exactly round(target · total weights), each layer's within its block's bounds.
`copal.masks.row_counts` spreads a layer's count over its rows (they differ by at most
one) and `layer_mask` keeps the highest scores under those counts.

‖X_j‖₂² is Σ x_j², which the wanda statistic (InputEnergy) and SparseGPT's
Hessian diagonal hold and which the accumulate regime sums across domains: OWL
computed from the accumulated values is continual too.

N:M structures keep their per-layer pattern: OWL's non-uniform sparsity cannot
be expressed as N:M, so asking for it with an N:M structure is an InputError
(`check_structure`), not a silent no-op.
"""

import math
from dataclasses import dataclass

import torch

from copal.errors import InputError
from copal.masks import Structure, select_mask


@dataclass(frozen=True)
class OWLProfile:
    """OWL's allocation: per block its outlier ratio and float sparsity, per layer
    the exact number of weights to prune and its shape."""

    ratios: dict[str, float]
    block_sparsity: dict[str, float]
    pruned: dict[str, int]
    shapes: dict[str, tuple[int, int]]

    def sparsity(self, layer: str) -> float:
        return self.pruned[layer] / math.prod(self.shapes[layer])

    def average(self) -> float:
        """The weight-count-weighted average sparsity over all layers."""
        return sum(self.pruned.values()) / sum(math.prod(shape) for shape in self.shapes.values())


def check_structure(structure: Structure) -> None:
    """OWL allocates unstructured sparsity only (see the module docstring)."""
    if structure.n_m:
        raise InputError(f"sparsity_profile owl: {structure.n_m[0]}:{structure.n_m[1]} keeps its per-layer "
                         f"pattern; OWL applies to unstructured sparsity only")


def check_options(target: float, lam: float, m: float) -> None:
    if not 0 <= target < 1:
        raise InputError(f"owl: sparsity {target} must be in [0, 1)")
    if not 0 <= lam <= min(target, 1 - target):
        raise InputError(f"owl.lam {lam} must be in [0, min(sparsity, 1 - sparsity)] = "
                         f"[0, {min(target, 1 - target):g}]")
    if m <= 0:
        raise InputError(f"owl.m {m} must be positive")


def wanda_score(weight: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
    """|W_ij| · ‖X_j‖₂ from Σ x_j² (`energy`, shape (in,))."""
    return weight.float().abs() * energy.float().clamp(min=0).sqrt()[None, :]


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Fraction of all the scores (one block's layers together) above m × their mean."""
    total = sum(float(score.double().sum()) for score in scores)
    count = sum(score.numel() for score in scores)
    threshold = m * total / count
    return sum(int((score > threshold).sum()) for score in scores) / count


def block_sparsities(ratios: dict[str, float], sizes: dict[str, int], target: float, lam: float) -> dict[str, float]:
    """s_b = clip(c − 2λ·u_b, target − λ, target + λ), u_b the block's ratio scaled to
    [0, 1] over the blocks, c such that Σ size_b · s_b = target · Σ size_b (bisection
    on a monotone function: deterministic). Equal ratios: every block at target."""
    low, high = min(ratios.values()), max(ratios.values())
    if high == low or lam == 0:
        return {block: target for block in ratios}
    scaled = {block: (ratio - low) / (high - low) for block, ratio in ratios.items()}
    total = sum(sizes.values())

    def sparsities(shift: float) -> dict[str, float]:
        return {block: min(max(shift - 2 * lam * u, target - lam), target + lam) for block, u in scaled.items()}

    below, above = target - lam, target + 3 * lam  # every block at its lower / upper bound
    for _ in range(200):
        middle = (below + above) / 2
        average = sum(sizes[block] * s for block, s in sparsities(middle).items()) / total
        below, above = (middle, above) if average < target else (below, middle)
    return sparsities((below + above) / 2)


def integer_counts(wanted: dict[str, float], bounds: dict[str, tuple[int, int]], total: int) -> dict[str, int]:
    """Integers within `bounds` adding up to `total`, as close to `wanted` as the
    largest-remainder rule makes them: floors first, then one more for the largest
    fractional parts (one fewer for the smallest, if the floors overshoot), ties by
    order of the layers."""
    counts = {name: min(max(math.floor(value), bounds[name][0]), bounds[name][1]) for name, value in wanted.items()}
    order = list(wanted)
    while (missing := total - sum(counts.values())) != 0:
        step = 1 if missing > 0 else -1
        room = [name for name in order if (counts[name] < bounds[name][1] if step > 0 else counts[name] > bounds[name][0])]
        if not room:
            raise InputError(f"owl: cannot prune exactly {total} weights within the layers' bounds")
        room.sort(key=lambda name: (-(wanted[name] - counts[name]) * step, order.index(name)))
        for name in room[:abs(missing)]:
            counts[name] += step
    return counts


def block_ratio(layers: dict[str, tuple[torch.Tensor, torch.Tensor]], m: float = 5.0,
                layer_mean: bool = False) -> float:
    """A block's outlier ratio from {layer: (weight (out, in), Σx² (in,))}: the paper's,
    over the block's scores together; or (`layer_mean`) the weight-weighted average of
    its layers' own ratios, each against its own mean, which scaling one layer's Σx²
    leaves unchanged."""
    scores = [wanda_score(weight, energy) for weight, energy in layers.values()]
    if not layer_mean:
        return outlier_ratio(scores, m)
    sizes = [score.numel() for score in scores]
    return sum(outlier_ratio([score], m) * size for score, size in zip(scores, sizes)) / sum(sizes)


def owl_profile(blocks: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], target: float,
                lam: float = 0.08, m: float = 5.0, layer_mean: bool = False) -> OWLProfile:
    """OWL's allocation for `blocks`: {block: {layer: (weight (out, in), Σx² (in,))}},
    in model order (`allocate` of each block's `block_ratio`)."""
    check_options(target, lam, m)
    ratios = {block: block_ratio(layers, m, layer_mean) for block, layers in blocks.items()}
    shapes = {block: {name: tuple(weight.shape) for name, (weight, _) in layers.items()}
              for block, layers in blocks.items()}
    return allocate(ratios, shapes, target, lam)


def allocate(ratios: dict[str, float], shapes: dict[str, dict[str, tuple[int, int]]], target: float,
             lam: float) -> OWLProfile:
    """Each layer's count of weights to prune from its block's outlier ratio (`ratios`)
    and the layers' shapes ({block: {layer: (out, in)}}). The counts add up to exactly
    round(target × all the weights); each layer's sparsity is within [target − λ,
    target + λ] (within one weight of it where λ × its size is under one weight).
    The callers check λ against the target (`check_options`)."""
    sizes = {name: math.prod(shape) for layers in shapes.values() for name, shape in layers.items()}
    block_of = {name: block for block, layers in shapes.items() for name in layers}
    block_sizes = {block: sum(sizes[name] for name in layers) for block, layers in shapes.items()}
    sparsity = block_sparsities(ratios, block_sizes, target, lam)
    total = round(target * sum(sizes.values()))
    strict = {name: (math.ceil(size * (target - lam) - 1e-9), math.floor(size * (target + lam) + 1e-9))
              for name, size in sizes.items()}
    loose = {name: (math.floor(size * (target - lam)), math.ceil(size * (target + lam))) for name, size in sizes.items()}
    feasible = (all(lo <= hi for lo, hi in strict.values())
                and sum(lo for lo, _ in strict.values()) <= total <= sum(hi for _, hi in strict.values()))
    wanted = {name: size * sparsity[block_of[name]] for name, size in sizes.items()}
    pruned = integer_counts(wanted, strict if feasible else loose, total)
    flat_shapes = {name: shape for layers in shapes.values() for name, shape in layers.items()}
    return OWLProfile(ratios, sparsity, pruned, flat_shapes)


def layer_mask(score: torch.Tensor, pruned: int, scope: str = "row") -> torch.Tensor:
    """Keep-mask dropping exactly `pruned` of the lowest scores: per row by
    `copal.masks.row_counts` (scope row), or over the whole layer (scope layer)."""
    return select_mask(score, Structure(pruned / score.numel(), scope=scope, pruned=pruned))
