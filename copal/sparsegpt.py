"""SparseGPT's layer-wise OBS pruning with weight reconstruction.

Written from the paper (Frantar & Alistarh, ICML 2023, Algorithm 1): columns are
processed left to right in blocks; within a block the mask is chosen from the
OBS saliency w²/[H⁻¹]²_jj and every pruned weight's error is spread over the
not-yet-processed columns through the Cholesky factor of H⁻¹.

Unstructured masks are chosen per row inside each block, with per-block counts
that add up to exactly round(s·in) per row, so every row ends at the target
sparsity like the other methods (the paper thresholds per block instead).
"""

import torch

from copal.masks import Structure, _prune_lowest


def _inverse_cholesky(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = dampening · mean(diag H)."""
    hessian = hessian.clone()
    damp = dampening * hessian.diagonal().mean()
    hessian.diagonal().add_(damp)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True)


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, structure: Structure,
                    forced_prune: torch.Tensor | None, blocksize: int = 128,
                    dampening: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    weight = weight.detach().float().clone()
    hessian = hessian.float().clone()
    rows, cols = weight.shape
    dead = hessian.diagonal() == 0  # inputs that never fired carry no information
    hessian[dead, dead] = 1
    weight[:, dead] = 0
    hinv = _inverse_cholesky(hessian, dampening)
    keep = torch.ones_like(weight, dtype=torch.bool)
    forced = forced_prune if forced_prune is not None else torch.zeros_like(keep)
    n_m = structure.n_m

    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block = weight[:, start:end].clone()
        hinv_block = hinv[start:end, start:end]
        diag = hinv_block.diagonal()
        errors = torch.zeros_like(block)
        block_keep = torch.ones_like(block, dtype=torch.bool)
        if n_m is None:
            saliency = (block.square() / diag.square()).masked_fill(forced[:, start:end], float("-inf"))
            if structure.scope == "layer":
                count = int(round(structure.sparsity * rows * end)) - int(round(structure.sparsity * rows * start))
                block_keep = _prune_lowest(saliency.reshape(1, -1), count).reshape(rows, end - start)
            else:
                count = structure.pruned_per_row(end) - structure.pruned_per_row(start)
                block_keep = _prune_lowest(saliency, count)
        for i in range(end - start):
            if n_m is not None and i % n_m[1] == 0:
                group = slice(i, i + n_m[1])
                saliency = block[:, group].square() / diag[group].square()
                saliency = saliency.masked_fill(forced[:, start:end][:, group], float("-inf"))
                block_keep[:, group] = _prune_lowest(saliency, n_m[1] - n_m[0])
            column = block[:, i]
            quantized = column * block_keep[:, i]
            error = (column - quantized) / diag[i]
            block[:, i:] -= error.unsqueeze(1) * hinv_block[i, i:].unsqueeze(0)
            block[:, i] = quantized
            errors[:, i] = error
        weight[:, start:end] = block
        keep[:, start:end] = block_keep
        weight[:, end:] -= errors @ hinv[start:end, end:]
    return keep, weight * keep
