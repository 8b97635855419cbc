"""Refit of a layer's kept weights on a fixed mask, from its input Hessian H = XᵀX.

Whatever chose the mask (wanda, copal, SparseGPT), the kept weights can be moved
so that the layer's output on the calibration tokens stays as close as possible
to the dense layer's: for each row w0 of W0 with kept set K (pruned set P),

    minimise  (ŵ − w0)ᵀ H (ŵ − w0)   over ŵ_K,  with ŵ_P = 0,

which is ‖X(Ŵ − W0)ᵀ‖² summed over rows. Setting the gradient on K to zero gives
one linear system per row, H_KK ŵ_K = (H w0)_K. In the accumulate regime H is
the Hessian accumulated across domains (each domain normalised), so the refit
is continual: no past data is kept, only H.

Solvers (`refit(..., solver=)`):

* `obs`: SparseGPT's optimal-brain-surgeon update with the mask given
  (copal.obs.sparsegpt_prune with `keep`): columns left to right,
  each pruned weight's error spread over the columns still to come. One pass,
  not the least-squares optimum (a column's update never revisits the columns
  before it).
* `pcg`: preconditioned conjugate gradient on all rows at once, as ALPS
  (Meng et al., arXiv 2406.07831, section 3.3) post-processes its support: the
  operator is P ↦ M ⊙ (P H) (M the keep-mask), one (rows × in) · (in × in)
  product per iteration for the whole layer; Jacobi (diag H on the kept
  positions) or block-Jacobi (each row's kept part of diagonal blocks of H,
  factorised once) preconditioning; warm-started from the OBS update or from
  W0 ⊙ M; a fixed iteration budget and a tolerance per row on the residual
  relative to the warm start's.
* `exact`: each row's system solved directly (float64), the reference the
  others are measured against; rows × in³ work, for small layers and tests.

All three use SparseGPT's dampening (H + λI, λ = dampening · mean diag H) and
its rule for inputs that never fired (diag H = 0: the entry of H set to 1, so
their rows of the system are decoupled). Unlike SparseGPT, a kept weight on
such an input keeps its W0 value (the data say nothing about it, and another
domain may use it); a pruned one is 0. Pruned positions are exactly zero in
every solver's result. Math in float32 (`exact`: float64), on the tensors'
device; deterministic for a given device and thread count.
"""

from dataclasses import dataclass

import torch

from copal.masks import Structure
from copal.obs import InverseFactors, sparsegpt_prune

SOLVERS = ("obs", "pcg", "exact")
PRECONDITIONERS = ("jacobi", "block")
WARM_STARTS = ("obs", "masked")


@dataclass(frozen=True)
class PCGOptions:
    """`iterations`: at most this many CG steps; `tolerance`: a row stops once
    ‖r‖ ≤ tolerance · ‖r₀‖ (its residual relative to the warm start's);
    `preconditioner`: jacobi | block (`block_size` inputs a block); `warm_start`:
    obs (the OBS update) | masked (W0 ⊙ M)."""

    iterations: int = 20
    tolerance: float = 1e-6
    preconditioner: str = "jacobi"
    block_size: int = 32
    warm_start: str = "obs"

    def __post_init__(self):
        if self.preconditioner not in PRECONDITIONERS:
            raise ValueError(f"pcg preconditioner {self.preconditioner!r}: choose one of {', '.join(PRECONDITIONERS)}")
        if self.warm_start not in WARM_STARTS:
            raise ValueError(f"pcg warm start {self.warm_start!r}: choose one of {', '.join(WARM_STARTS)}")
        if self.iterations < 0 or self.tolerance < 0 or self.block_size < 1:
            raise ValueError("pcg iterations and tolerance must be ≥ 0 and block_size ≥ 1")


def damped_hessian(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """H as SparseGPT inverts it, float32: never-firing inputs' diagonal set to 1,
    then λ = dampening · mean(diag) added to the diagonal."""
    damped = hessian.detach().float().clone()
    dead = damped.diagonal() == 0
    damped[dead, dead] = 1
    damped.diagonal().add_(dampening * damped.diagonal().mean())
    return damped


def reconstruction_error(weight: torch.Tensor, hessian: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per row, (w − w0)ᵀ H (w − w0) = ‖X(w − w0)‖²: the layer-wise objective (float64)."""
    delta = (weight.double() - reference.double())
    return ((delta @ hessian.double()) * delta).sum(1)


def refit(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, solver: str = "pcg",
          dampening: float = 0.01, options: PCGOptions = PCGOptions(), blocksize: int = 128,
          layer: str | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
    """The refit weight (out, in), float32, zero where `keep` is False.

    `weight`: W0 (out, in); `hessian`: H (in, in), e.g. accumulated; `keep`: the
    bool keep-mask; `blocksize`: the OBS update's column block (SparseGPT's);
    `layer`: the layer's name, for messages; `start`: pcg's warm start when the
    caller already holds one (SparseGPT's own update), instead of `options.warm_start`."""
    if solver not in SOLVERS:
        raise ValueError(f"refit solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    keep = keep.to(weight.device, torch.bool)
    if solver == "obs":
        return obs_refit(weight, hessian, keep, dampening, blocksize, layer)
    damped = damped_hessian(hessian.to(weight.device), dampening)
    if solver == "exact":
        return exact_refit(weight, damped, keep)
    if start is not None:
        start = start.to(weight.device)
    elif options.warm_start == "obs":
        start = obs_refit(weight, hessian, keep, dampening, blocksize, layer)
    else:
        start = weight.float() * keep
    return pcg_refit(weight, damped, keep, start, options)


def obs_refit(weight: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor, dampening: float = 0.01,
              blocksize: int = 128, layer: str | None = None) -> torch.Tensor:
    """SparseGPT's OBS update with the mask given. sparsegpt_prune zeroes every
    weight of a never-firing input; such inputs are decoupled from the others in
    H⁻¹, so giving the kept ones back their W0 value is the same update."""
    structure = Structure(0.0)  # unused: with `keep` given, sparsegpt_prune chooses no mask
    _, updated = sparsegpt_prune(weight, hessian.to(weight.device), structure, None, blocksize, dampening, layer,
                                 keep, InverseFactors())
    dead = hessian.diagonal().to(weight.device) == 0
    updated[:, dead] = weight.float()[:, dead] * keep[:, dead]
    return updated


def exact_refit(weight: torch.Tensor, damped: torch.Tensor, keep: torch.Tensor, chunk_bytes: int = 1 << 28) -> torch.Tensor:
    """Each row's H_KK ŵ_K = (H w0)_K solved directly in float64, rows in chunks of
    at most `chunk_bytes` of systems. Rows that keep equally many weights (per-row
    and N:M masks) solve their k × k systems H_KK; otherwise each row solves the
    in × in system M H M + (I − M) (H_KK on K, the identity on P) with right-hand
    side M ⊙ (H w0)."""
    rows, cols = weight.shape
    h = damped.double()
    rhs = weight.double() @ h
    result = torch.zeros(rows, cols, dtype=torch.float64, device=weight.device)
    counts = keep.sum(1)
    kept = int(counts[0]) if rows else 0
    if bool((counts == kept).all()):
        index = keep.nonzero()[:, 1].reshape(rows, kept)  # each row's kept columns, ascending
        per_chunk = max(1, chunk_bytes // (8 * max(kept, 1) ** 2))
        for first in range(0, rows, per_chunk):
            chunk = index[first:first + per_chunk]
            systems = h[chunk[:, :, None], chunk[:, None, :]]
            solved = torch.linalg.solve(systems, rhs[first:first + per_chunk].gather(1, chunk))
            result[first:first + per_chunk].scatter_(1, chunk, solved)
        return result.float()
    per_chunk = max(1, chunk_bytes // (8 * cols * cols))
    for first in range(0, rows, per_chunk):
        m = keep[first:first + per_chunk].double()
        systems = m[:, :, None] * h * m[:, None, :] + torch.diag_embed(1 - m)
        result[first:first + per_chunk] = torch.linalg.solve(systems, m * rhs[first:first + per_chunk])
    return (result * keep).float()


class _Jacobi:
    """z = r / diag(H) on the kept positions."""

    def __init__(self, damped: torch.Tensor, keep: torch.Tensor):
        self.inverse = keep / damped.diagonal()[None, :]

    def __call__(self, residual: torch.Tensor) -> torch.Tensor:
        return residual * self.inverse


class _BlockJacobi:
    """z_B = (M_B H_BB M_B + I − M_B)⁻¹ r_B for every row and every diagonal block B of
    `size` inputs: each row's kept part of the block, factorised once (Cholesky).
    Memory: rows × in × size floats."""

    def __init__(self, damped: torch.Tensor, keep: torch.Tensor, size: int):
        rows, cols = keep.shape
        self.cols, self.size = cols, size
        pad = -cols % size
        h = torch.nn.functional.pad(damped, (0, pad, 0, pad))
        h.diagonal()[cols:] = 1
        m = torch.nn.functional.pad(keep.float(), (0, pad))
        count = (cols + pad) // size
        index = torch.arange(count, device=h.device)
        blocks = h.reshape(count, size, count, size)[index, :, index, :]  # (count, size, size)
        m = m.reshape(rows, count, size)
        systems = m[..., :, None] * blocks[None] * m[..., None, :] + torch.diag_embed(1 - m)
        self.factors = torch.linalg.cholesky(systems)
        self.keep = keep

    def __call__(self, residual: torch.Tensor) -> torch.Tensor:
        rows = residual.shape[0]
        padded = torch.nn.functional.pad(residual, (0, -self.cols % self.size)).reshape(rows, -1, self.size, 1)
        solved = torch.cholesky_solve(padded, self.factors).reshape(rows, -1)[:, :self.cols]
        return solved * self.keep


def pcg_refit(weight: torch.Tensor, damped: torch.Tensor, keep: torch.Tensor, start: torch.Tensor,
              options: PCGOptions = PCGOptions()) -> torch.Tensor:
    """CG on every row at once for M ⊙ (Ŵ H) = M ⊙ (W0 H) over Ŵ = Ŵ ⊙ M, from `start`.
    Row-wise step sizes; a row that reached the tolerance is frozen (its step is 0 from
    then on: its residual no longer changes, so it stays below the tolerance), and the
    loop ends when every row has. Updates run in place: besides the one product with
    H, an iteration is a few passes over the (rows × in) matrices."""
    mask = keep.float()
    h = damped.float()
    x = start.float() * mask
    r = ((weight.float() - x) @ h).mul_(mask)  # b − A x with b = M ⊙ (W0 H): one product with H, not two
    precondition = (_Jacobi(h, mask) if options.preconditioner == "jacobi"
                    else _BlockJacobi(h, keep, options.block_size))
    z = precondition(r)
    p = z.clone()
    rz = torch.linalg.vecdot(r, z)
    limit = options.tolerance * r.norm(dim=1)
    tiny = torch.finfo(torch.float32).tiny
    for _ in range(options.iterations):
        active = r.norm(dim=1) > limit
        if not bool(active.any()):
            break
        hp = (p @ h).mul_(mask)
        curvature = torch.linalg.vecdot(p, hp)
        alpha = torch.where(active & (curvature > 0), rz / curvature.clamp(min=tiny), 0.0)[:, None]
        x.addcmul_(p, alpha)
        r.addcmul_(hp, alpha, value=-1)
        z = precondition(r)
        rz_next = torch.linalg.vecdot(r, z)
        beta = torch.where(active & (rz > 0), rz_next / rz.clamp(min=tiny), 0.0)
        p.mul_(beta[:, None]).add_(z)  # a frozen row's direction no longer matters: its step is 0
        rz = torch.where(active, rz_next, rz)
    return x * mask
