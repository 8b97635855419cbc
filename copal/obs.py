"""SparseGPT's layer-wise OBS algorithm (Frantar & Alistarh, ICML 2023, Algorithm 1):
the mask chosen column block by column block from the saliency w²/[H⁻¹]²_jj, and
every pruned weight's error spread over the columns still to come through the
Cholesky factor of H⁻¹; or, with a mask given, only that update.

Unstructured masks are chosen per row inside each block, with per-block counts
that add up to exactly round(s·in) per row, so every row ends at the target
sparsity like the other methods (the paper thresholds per block instead).

Below the methods: copal.methods.sparsegpt (the method), copal.methods.copal
(its `reconstruct` variant) and copal.refit (the OBS refit and PCG's warm start)
use it.
"""

import logging

import torch

from copal.masks import Structure, drop_lowest, drop_lowest_per_row, row_counts


def _inverse_cholesky(hessian: torch.Tensor, dampening: float, layer: str | None = None,
                      retries: int = 3) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = dampening · mean(diag H).

    A Hessian that is not positive definite in floating point (too few calibration
    tokens, accumulated round-off) makes a Cholesky factorisation fail: then the
    dampening is raised tenfold, up to `retries` times, with a warning naming the
    layer; if it still fails, a LinAlgError says which layer and what was tried."""
    where = f"{layer}: " if layer else ""
    mean_diagonal = hessian.diagonal().mean()
    for attempt in range(retries + 1):
        damped = hessian.clone()
        damped.diagonal().add_(dampening * mean_diagonal)
        try:
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError as error:
            if attempt == retries:
                cause = ("it has NaN or infinite entries (non-finite activations)"
                         if not torch.isfinite(hessian).all() else
                         "use more calibration data (calibration.nsamples) or a larger sparsegpt.dampening")
                raise torch.linalg.LinAlgError(
                    f"{where}SparseGPT cannot invert the Hessian (not positive definite even with dampening "
                    f"{dampening:g} after {retries} tenfold increases): {cause}") from error
            logging.getLogger("copal").warning(
                "%sSparseGPT: Cholesky factorisation of the Hessian failed with dampening %g; retrying with %g",
                where, dampening, dampening * 10)
            dampening *= 10


class InverseFactors:
    """The last Hessian's inverse Cholesky factor, reused while the next layers'
    Hessians are equal to it: layers that read one input (q/k/v, gate/up) have equal
    Hessians in every regime, so a LLaMA block factorises 4 times instead of 7.
    The method clears it at the end of each block (`Method.finish_block`), so no
    factor outlives its block."""

    def __init__(self):
        self._hessian: torch.Tensor | None = None
        self._version = -1
        self._factor: torch.Tensor | None = None

    def get(self, hessian: torch.Tensor, dampening: float, layer: str | None) -> torch.Tensor:
        """The factor of `hessian` with its never-firing inputs set to 1 on the diagonal."""
        last = self._hessian
        if (last is not None and last._version == self._version and last.shape == hessian.shape
                and torch.equal(last, hessian)):
            return self._factor
        fixed = hessian.float().clone()
        dead = fixed.diagonal() == 0
        fixed[dead, dead] = 1
        self._factor = _inverse_cholesky(fixed, dampening, layer)
        self._hessian, self._version = hessian, hessian._version
        return self._factor

    def clear(self) -> None:
        self._hessian = self._factor = None


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, structure: Structure,
                    forced_prune: torch.Tensor | None, blocksize: int = 128,
                    dampening: float = 0.01, layer: str | None = None,
                    keep: torch.Tensor | None = None,
                    factors: InverseFactors | None = None, solve: str = "loop") -> tuple[torch.Tensor, torch.Tensor]:
    """(keep-mask, reconstructed weight). `keep`: a mask chosen elsewhere; then only
    the OBS update runs, spreading each pruned weight's error over the columns
    still to come (COPAL's `reconstruct` variant). `factors`: the caller's cache of
    the last inverse factor (a fresh one when None). `solve`: how a block's errors are
    found: `loop`, column by column (the paper's); `batched`, every row's triangular
    system at once (`_group_errors`), the same arithmetic in another order, without a
    kernel launch per column (the GPU's bottleneck)."""
    weight = weight.detach().float().clone()
    rows, cols = weight.shape
    dead = hessian.diagonal() == 0  # inputs that never fired carry no information
    weight[:, dead] = 0
    hinv = (factors or InverseFactors()).get(hessian, dampening, layer)
    chosen, keep = keep, torch.ones_like(weight, dtype=torch.bool)
    forced = forced_prune if forced_prune is not None else torch.zeros_like(keep)
    n_m = None if chosen is not None else structure.n_m

    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = weight[:, start:end].clone()
        hinv_block = hinv[start:end, start:end]
        diag = hinv_block.diagonal()
        errors = torch.zeros_like(block)
        block_keep = torch.ones_like(block, dtype=torch.bool)
        if chosen is not None:
            block_keep = chosen[:, start:end].clone()
        elif n_m is None:
            saliency = (block.square() / diag.square()).masked_fill(forced[:, start:end], float("-inf"))
            if structure.pruned is not None:  # an exact count (a sparsity profile's), spread evenly over the blocks
                block_keep = _keep_exactly(saliency, structure, rows, cols, start, end)
            elif structure.scope == "layer":
                count = int(round(structure.sparsity * rows * end)) - int(round(structure.sparsity * rows * start))
                block_keep = drop_lowest(saliency.reshape(1, -1), count).reshape(rows, end - start)
            else:
                count = structure.pruned_per_row(end) - structure.pruned_per_row(start)
                block_keep = drop_lowest(saliency, count)
        group = (n_m[1] if n_m is not None else end - start) if solve == "batched" else 1
        _spread_errors(block, block_keep, hinv_block, forced[:, start:end], n_m, errors, group)
        weight[:, start:end] = block
        keep[:, start:end] = block_keep
        weight[:, end:] -= errors @ hinv[start:end, end:]
    return keep, weight * keep


def _keep_exactly(saliency: torch.Tensor, structure: Structure, rows: int, cols: int, start: int,
                  end: int) -> torch.Tensor:
    """A column block's mask under `structure.pruned`: each row's (row scope) or the
    layer's count pruned in proportion to the columns so far, P·end//cols − P·start//cols,
    which adds up to exactly P over the blocks."""
    if structure.scope == "layer":
        total = structure.pruned
        count = total * end // cols - total * start // cols
        return drop_lowest(saliency.reshape(1, -1), count).reshape(rows, end - start)
    totals = row_counts(structure.pruned, rows, cols).to(saliency.device)
    return drop_lowest_per_row(saliency, totals * end // cols - totals * start // cols)


def _spread_errors(block: torch.Tensor, keep: torch.Tensor, factor: torch.Tensor, forced: torch.Tensor,
                   n_m: tuple[int, int] | None, errors: torch.Tensor, group: int) -> None:
    """In place, one column block: its columns left to right, `group` at a time (1: the
    paper's loop), each pruned weight's error (into `errors`) spread over the block's
    later columns; an N:M group's mask (into `keep`) chosen when its columns come."""
    diag = factor.diagonal()
    for i in range(0, block.shape[1], group):
        if n_m is not None and i % n_m[1] == 0:
            columns = slice(i, i + n_m[1])
            saliency = block[:, columns].square() / diag[columns].square()
            keep[:, columns] = drop_lowest(saliency.masked_fill(forced[:, columns], float("-inf")), n_m[1] - n_m[0])
        if group == 1:
            column = block[:, i]
            quantized = column * keep[:, i]
            error = (column - quantized) / diag[i]
            block[:, i:] -= error.unsqueeze(1) * factor[i, i:].unsqueeze(0)
            block[:, i] = quantized
            errors[:, i] = error
            continue
        columns = slice(i, min(i + group, block.shape[1]))
        error = _group_errors(block[:, columns], keep[:, columns], factor[columns, columns])
        block[:, columns] = (block[:, columns] - error @ factor[columns, columns]) * keep[:, columns]
        block[:, columns.stop:] -= error @ factor[columns, columns.stop:]
        errors[:, columns] = error


def resolved_solve(solve: str, device: torch.device) -> str:
    """`auto`: `batched` on CUDA (a launch per column is what bounds the GPU), `loop`
    elsewhere (on a CPU the loop is as fast, and it is what the golden masks record)."""
    if solve != "auto":
        return solve
    return "batched" if torch.device(device).type == "cuda" else "loop"


def _group_errors(values: torch.Tensor, keep: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The errors the column loop spreads over a group of columns with a fixed mask, all
    rows at once. Column j's error is e_j = p_j (w_j − Σ_{k<j} e_k U_kj) / U_jj (p_j: 1 where
    pruned), i.e. per row the lower-triangular system (U ⊙ ppᵀ + diag(1 − p))ᵀ e = p ⊙ w."""
    pruned = (~keep).to(values.dtype)
    systems = factor.triu() * (pruned[:, :, None] * pruned[:, None, :]) + torch.diag_embed(1 - pruned)
    solved = torch.linalg.solve_triangular(systems.transpose(1, 2), (pruned * values).unsqueeze(2), upper=False)
    return solved.squeeze(2)
