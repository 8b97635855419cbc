"""A layer's mask and kept weights together, by ADMM on the layer-wise objective, in
the spirit of ALPS (Meng et al., arXiv 2406.07831, sections 3.1-3.2): `copal.mask:
admm`'s mask (copal.methods.copal), measured in benchmarks/admm_speed.py.

    minimise  ½ (W − W0) H (W − W0)ᵀ   subject to W's sparsity pattern (structure),

split as W = D with D sparse: W takes a ridge step towards D − V, D is the projection
of W + V onto the structure (its largest entries), V accumulates W − D, and the penalty
ρ grows as the iterations go, so that D settles (a fixed schedule, for determinism).
The layer is solved in the coordinates where H has a unit diagonal (w' = w ⊙ √diag H),
so the projection ranks |w'| = |w| · √diag H, Wanda's score, and one schedule suits
every layer.

The schedule is short: ρ grows `growth`-fold every `rho_every` iterations, the W step one
product with (H + ρI)⁻¹, inverted once per ρ (Cholesky). The caller refits the kept
weights on D's support from D itself (copal.refit's pcg), as ALPS post-processes its
support: D is already close. Four iterations (ρ 0.2, then 0.8) and four of the refit,
copal's default, leave 7-13 % more layer error than eight iterations with a refit from
W0 ⊙ M, in 55-58 % of their time, and 4-18 % less than SparseGPT's mask with its refit,
in less time (docs/RESULTS.md, "ADMM's refit from its own weights").
"""

from dataclasses import dataclass

import torch

from copal.masks import Structure, select_mask
from copal.refit import damped_hessian


@dataclass(frozen=True)
class ADMMOptions:
    """`iterations` of ADMM; ρ starts at `rho` (H normalised to a unit diagonal) and is
    multiplied by `growth` every `rho_every` iterations."""

    iterations: int = 4
    rho: float = 0.2
    growth: float = 4.0
    rho_every: int = 2


def _ridge_inverse(normalised: torch.Tensor, rho: float) -> torch.Tensor:
    """(H + ρI)⁻¹ of the unit-diagonal H, symmetric positive definite."""
    shifted = normalised + rho * torch.eye(normalised.shape[0], dtype=normalised.dtype, device=normalised.device)
    return torch.cholesky_inverse(torch.linalg.cholesky(shifted))


def admm_prune(weight: torch.Tensor, hessian: torch.Tensor, structure: Structure, dampening: float = 0.01,
               options: ADMMOptions = ADMMOptions(),
               forced_prune: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep-mask, weight (out, in) float32 with its pruned entries zero)."""
    damped = damped_hessian(hessian, dampening)
    scale = damped.diagonal().sqrt()
    normalised = damped / scale[:, None] / scale[None, :]
    start = weight.float() * scale
    target = start @ normalised
    keep = select_mask(start.abs(), structure, forced_prune)
    sparse, dual, rho = start * keep, torch.zeros_like(start), options.rho
    for iteration in range(options.iterations):
        if iteration % options.rho_every == 0:
            if iteration:
                rho *= options.growth
            inverse = _ridge_inverse(normalised, rho)
        moved = torch.add(target, sparse.sub_(dual), alpha=rho) @ inverse + dual  # W + V
        keep = select_mask(moved.abs(), structure, forced_prune)
        sparse = moved * keep
        dual = moved.sub_(sparse)  # V + W − D
    return keep, sparse / scale
