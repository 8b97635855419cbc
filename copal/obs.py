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

from copal.masks import Structure, drop_lowest


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
                    factors: InverseFactors | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep-mask, reconstructed weight). `keep`: a mask chosen elsewhere; then only
    the OBS update runs, spreading each pruned weight's error over the columns
    still to come (COPAL's `reconstruct` variant). `factors`: the caller's cache of
    the last inverse factor (a fresh one when None)."""
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
            if structure.scope == "layer":
                count = int(round(structure.sparsity * rows * end)) - int(round(structure.sparsity * rows * start))
                block_keep = drop_lowest(saliency.reshape(1, -1), count).reshape(rows, end - start)
            else:
                count = structure.pruned_per_row(end) - structure.pruned_per_row(start)
                block_keep = drop_lowest(saliency, count)
        for i in range(end - start):
            if n_m is not None and i % n_m[1] == 0:
                group = slice(i, i + n_m[1])
                saliency = block[:, group].square() / diag[group].square()
                saliency = saliency.masked_fill(forced[:, start:end][:, group], float("-inf"))
                block_keep[:, group] = drop_lowest(saliency, n_m[1] - n_m[0])
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
