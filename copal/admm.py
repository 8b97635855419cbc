"""A layer's mask and kept weights together, by ADMM on the layer-wise objective, in
the spirit of ALPS (Meng et al., arXiv 2406.07831, sections 3.1-3.2): `copal.mask:
admm`'s mask (copal.methods.copal), measured in benchmarks/refit_owl.py.

    minimise  ½ (W − W0) H (W − W0)ᵀ   subject to W's sparsity pattern (structure),

split as W = D with D sparse: W takes a ridge step towards D − V, D is the projection
of W + V onto the structure (its largest entries), V accumulates W − D, and the penalty
ρ grows each iteration, so that D settles (a fixed count of iterations, for determinism). The layer is solved in the coordinates
where H has a unit diagonal (w' = w ⊙ √diag H), so the projection ranks |w'| =
|w| · √diag H, Wanda's score, and one ρ suits every layer. The W step is one product
with H's eigendecomposition, (W0'H' + ρ(D − V)) Q diag(1/(λ + ρ)) Qᵀ, factorised once.
The caller may then refit the kept weights on D's support (copal.refit, pcg), as
ALPS post-processes its support.
"""

from dataclasses import dataclass

import torch

from copal.masks import Structure, select_mask
from copal.refit import damped_hessian


@dataclass(frozen=True)
class ADMMOptions:
    """`iterations` of ADMM; ρ starts at `rho` (H normalised to a unit diagonal) and is
    multiplied by `growth` after each."""

    iterations: int = 60
    rho: float = 0.1
    growth: float = 1.1


def admm_prune(weight: torch.Tensor, hessian: torch.Tensor, structure: Structure, dampening: float = 0.01,
               options: ADMMOptions = ADMMOptions(),
               forced_prune: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep-mask, weight (out, in) float32 with its pruned entries zero)."""
    damped = damped_hessian(hessian, dampening)
    scale = damped.diagonal().sqrt()
    normalised = damped / scale[:, None] / scale[None, :]
    eigenvalues, basis = torch.linalg.eigh(normalised.double())
    eigenvalues, basis = eigenvalues.float(), basis.float()
    start = weight.float() * scale
    target = start @ normalised
    keep = select_mask(start.abs(), structure, forced_prune)
    sparse, dual, rho = start * keep, torch.zeros_like(start), options.rho
    for _ in range(options.iterations):
        dense = ((target + rho * (sparse - dual)) @ basis / (eigenvalues + rho)) @ basis.t()
        keep = select_mask((dense + dual).abs(), structure, forced_prune)
        sparse = (dense + dual) * keep
        dual += dense - sparse
        rho *= options.growth
    return keep, sparse / scale
