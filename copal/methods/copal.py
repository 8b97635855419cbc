"""COPAL (Malla et al., ICML 2024): a sensitivity accumulated across domains, applied
to the dense weights.

Three sensitivities (docs/METHOD.md):

* `hessian` (the default): the second-order one. Each layer's input Hessian
  H = Σ x xᵀ is accumulated across domains (each normalised). ADMM on the layer-wise
  objective ‖X(W − W0)ᵀ‖² chooses the mask from it (`mask: admm`, copal.admm, ALPS's
  splitting), and conjugate gradient then refits the kept weights towards the
  least-squares optimum on that mask (ALPS's refit, `refit: pcg`, `refit_iterations`).
  Measured the best continual pruner on SmolLM2 (docs/RESULTS.md). `mask: obs` lets
  SparseGPT's optimal brain surgeon choose instead (saliency w²/[H⁻¹]²_jj, column block
  by column block, updating the kept weights), before the same refit.
* `output`: the paper's first-order one, |W| · |∂(½‖y‖²)/∂W| summed per token, from
  each layer's own input and output. `reconstruct` keeps its mask and refits the kept
  weights from the Hessian accumulated the same way (`refit`: obs or pcg).
* `loss`: the language-model loss's gradient |∂L/∂W|, from a backward pass through
  the whole model.

`normalize` and `reduce` say how domains combine.
"""

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from transformers.pytorch_utils import Conv1D

from copal.admm import ADMMOptions, admm_prune
from copal.masks import Structure, select_mask
from copal.methods.base import Method, Statistic, accumulate
from copal.methods.sparsegpt import Hessian, SparseGPT
from copal.obs import InverseFactors, resolved_solve, sparsegpt_prune
from copal.model import all_prunable, weight_matrix
from copal.options import Strict
from copal.refit import PCGOptions, refit as refit_kept


class CopalOptions(Strict):
    """The config's `copal:` section: the variants of docs/METHOD.md; the defaults
    are the measured best."""

    sensitivity: Literal["hessian", "output", "loss"] = "hessian"
    normalize: bool = True
    reduce: Literal["sum", "max"] = "sum"
    # `reconstruct` (sensitivity: output): COPAL's mask, then the kept weights rebuilt from
    # the accumulated Hessian. The `sparsegpt:` section's blocksize, dampening and solve
    # say how the OBS update runs, for this and for sensitivity: hessian.
    reconstruct: bool = False
    # How the kept weights move where they are rebuilt: `obs`, SparseGPT's one-pass update;
    # `pcg`, then conjugate gradient towards the least-squares optimum on the fixed mask
    # (ALPS's refit; copal.refit). Unset: pcg for sensitivity: hessian, obs for reconstruct.
    refit: Literal["obs", "pcg"] | None = None
    # Unset: 4 where the refit starts from ADMM's own weights (refit_start: admm), which
    # come close already; 8 from the others.
    refit_iterations: int | None = Field(None, ge=1, description="pcg: conjugate-gradient iterations per layer "
                                                                  "(at most)")
    # sensitivity: hessian's mask: `admm` (its default), mask and weights together by ADMM
    # on the layer-wise objective (copal.admm, ALPS's splitting), the kept weights then
    # refit on that mask; `obs`, SparseGPT's (chosen column block by column block inside
    # its update). Unset: admm for sensitivity: hessian, obs (unused) for the others.
    mask: Literal["obs", "admm"] = "admm"
    # mask: admm's refit starts from `admm`, ADMM's sparse weights (a recompute runs ADMM
    # again to have them), or from `masked`, W0 ⊙ M (a recompute needs only the mask; it
    # takes twice the iterations to come as close: docs/RESULTS.md).
    refit_start: Literal["admm", "masked"] = "admm"
    admm_iterations: int = Field(4, ge=1, description="mask: admm: ADMM iterations per layer (ρ 0.2, ×4 every 2)")

    @model_validator(mode="before")
    @classmethod
    def _resolve_unset(cls, data):
        if not isinstance(data, dict):
            return data
        if data.get("mask") is None:
            sensitivity = data.get("sensitivity", cls.model_fields["sensitivity"].default)
            data = {**data, "mask": "admm" if sensitivity == "hessian" else "obs"}
        if data.get("refit_iterations") is None:
            from_admm = data["mask"] == "admm" and data.get("refit_start", "admm") == "admm"
            data = {**data, "refit_iterations": 4 if from_admm else 8}
        return data

    @model_validator(mode="after")
    def _coherent(self) -> "CopalOptions":
        if self.reconstruct and self.sensitivity != "output":
            raise ValueError("reconstruct refits the kept weights of the output sensitivity's mask; it needs "
                             "sensitivity: output (sensitivity: hessian rebuilds them already)")
        if self.refit == "pcg" and self.sensitivity == "output" and not self.reconstruct:
            raise ValueError("refit: pcg refits from the accumulated Hessian; with sensitivity: output it needs "
                             "reconstruct: true")
        if self.mask == "admm" and self.sensitivity != "hessian":
            raise ValueError("mask: admm chooses from the accumulated Hessian; it needs sensitivity: hessian")
        if self.reduce == "max" and (self.reconstruct or self.sensitivity == "hessian"):
            raise ValueError("an elementwise max of Hessians over domains is not a Hessian; "
                             "the Hessian needs reduce: sum")
        return self

    @property
    def rebuilt_by(self) -> str:
        """How the kept weights are rebuilt: the refit that applies (obs | pcg), or
        "" where they are kept as they are (output without reconstruct, loss)."""
        if self.sensitivity == "hessian":
            return self.refit or "pcg"
        return (self.refit or "obs") if self.reconstruct else ""


class OutputSensitivity(Statistic):
    """S_ij = Σ_tokens |y_i|·|x_j| = (|Y|ᵀ|X|)_ij: the magnitude of ∂(½‖y‖²)/∂W_ij
    summed per token."""

    per_weight = True

    @staticmethod
    def value_shape(out_features, in_features):
        return (out_features, in_features)

    def add(self, inputs, y):
        self.value.addmm_(y.abs().t(), inputs.abs)


class SensitivityAndHessian(Statistic):
    """The output sensitivity S (out, in) stacked on the input Hessian H = Σ x xᵀ
    (in, in), one (out + in, in) tensor: what the `reconstruct` variant needs
    (S chooses the mask, H reconstructs the kept weights)."""

    @staticmethod
    def value_shape(out_features, in_features):
        return (out_features + in_features, in_features)

    def add(self, inputs, y):
        sensitivity, hessian = split_hessian(self.value)
        sensitivity.addmm_(y.abs().t(), inputs.abs)
        hessian.addmm_(inputs.x.t(), inputs.x)


def split_hessian(stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, H) views of a SensitivityAndHessian value."""
    rows = stacked.shape[0] - stacked.shape[1]
    return stacked[:rows], stacked[rows:]


def loss_gradient_statistic(model: nn.Module, batches: list[torch.Tensor], device: torch.device,
                            names: list[str]) -> dict[str, torch.Tensor]:
    """S_ij = Σ_batches |∂L/∂W_ij| of the language-model loss for the named layers:
    one backward pass through the whole model per batch, so the whole model and
    its gradients sit on `device`."""
    modules = all_prunable(model)
    model.to(device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in names:
        modules[name].weight.requires_grad_(True)
    sums = {name: torch.zeros_like(weight_matrix(modules[name]), dtype=torch.float32) for name in names}
    try:
        for batch in batches:
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            loss.backward()
            for name in names:
                module = modules[name]
                grad = module.weight.grad
                sums[name] += (grad.t() if isinstance(module, Conv1D) else grad).abs().float()
                module.weight.grad = None
    finally:
        for name in names:
            modules[name].weight.requires_grad_(False)
        model.to("cpu")
    return {name: value.cpu() for name, value in sums.items()}


def _normalised(value: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return value / scale if scale > 0 else value


class Copal(Method):
    name = "copal"

    def __init__(self, sensitivity: str = "hessian", normalize: bool = True, reduce: str = "sum",
                 reconstruct: bool = False, refit: str | None = None, refit_iterations: int | None = None,
                 mask: str | None = None, blocksize: int = 128, dampening: float = 0.01, solve: str = "auto",
                 refit_start: str = "admm", admm_iterations: int = 4):
        options = CopalOptions(sensitivity=sensitivity, normalize=normalize, reduce=reduce, reconstruct=reconstruct,
                               refit=refit, refit_iterations=refit_iterations, mask=mask, refit_start=refit_start,
                               admm_iterations=admm_iterations)
        self.mask = mask = options.mask
        self.refit_start = options.refit_start
        self.admm = ADMMOptions(iterations=admm_iterations)
        refit_iterations = options.refit_iterations
        self.sensitivity = sensitivity
        self.normalize = normalize
        self.reduce = reduce
        self.reconstruct = reconstruct
        self.refit = options.rebuilt_by or "obs"
        self.blocksize, self.dampening = blocksize, dampening  # the reconstruction's (SparseGPT's)
        # ADMM's mask comes without an OBS update to start from (an OBS pass would add about
        # half the short ADMM's time again): its refit starts from ADMM's weights, or W0 ⊙ M.
        self.pcg = PCGOptions(iterations=refit_iterations, warm_start="masked" if mask == "admm" else "obs")
        self.solve = solve
        self.factors = InverseFactors()
        # sensitivity: hessian is SparseGPT's pass, and its refit, on the accumulated Hessian
        self.second_order = (SparseGPT(blocksize, dampening, self.refit, refit_iterations, solve)
                             if sensitivity == "hessian" and mask == "obs" else None)
        self.statistic = {"hessian": Hessian, "loss": None}.get(
            sensitivity, SensitivityAndHessian if reconstruct else OutputSensitivity)
        self.whole_model = sensitivity == "loss"
        self.stacks_rows = sensitivity == "hessian"  # per-row masks and a row-wise rebuild

    @classmethod
    def from_config(cls, config):
        return cls(**config.copal.model_dump(), blocksize=config.sparsegpt.blocksize,
                   dampening=config.sparsegpt.dampening, solve=config.sparsegpt.solve)

    @classmethod
    def from_options(cls, options):
        # What older records meant by the keys they lack: before `mask` existed the hessian
        # sensitivity took SparseGPT's mask, and before `refit_start` ADMM's refit started
        # from W0 ⊙ M.
        return cls(**({"mask": "obs", "refit_start": "masked"} | options))

    def score(self, weight, stat):
        return weight.abs() * stat

    def prune(self, weight, stat, structure, forced_prune=None, layer=None):
        if self.second_order is not None:
            return self.second_order.prune(weight, stat, structure, forced_prune, layer)
        if self.mask == "admm":
            keep, sparse = admm_prune(weight, stat, structure, self.dampening, self.admm, forced_prune)
            if self.refit_start == "admm":
                return keep, self._refit_from(weight, stat, keep, sparse, layer)
        elif not self.reconstruct:
            return super().prune(weight, stat, structure, forced_prune, layer)
        else:
            keep = select_mask(self.score(weight.float(), split_hessian(stat)[0]), structure, forced_prune)
        return keep, self.reweight(weight, stat, keep, layer)

    def reweight(self, weight, stat, keep, layer=None, structure=None):
        if self.second_order is not None:
            return self.second_order.reweight(weight, stat, keep, layer)
        if self.mask == "admm" and self.refit_start == "admm":
            return self._refit_from(weight, stat, keep, self._admm_again(weight, stat, keep, layer, structure), layer)
        if self.mask == "admm":  # the refit from the mask alone: W0, H and the mask recompute it
            return refit_kept(weight, stat, keep, self.refit, self.dampening, self.pcg, self.blocksize, layer)
        if not self.reconstruct:
            return None
        _, hessian = split_hessian(stat)
        if self.refit == "pcg":
            return refit_kept(weight, hessian, keep, "pcg", self.dampening, self.pcg, self.blocksize, layer)
        return sparsegpt_prune(weight, hessian, Structure(0.0), None, self.blocksize, self.dampening, layer, keep,
                               self.factors, resolved_solve(self.solve, weight.device))[1]

    def _refit_from(self, weight, hessian, keep, sparse, layer):
        """The kept weights refit from ADMM's sparse weights: prune and reweight both end
        here, so that a recompute gives the step's bits."""
        return refit_kept(weight, hessian, keep, "pcg", self.dampening, self.pcg, layer=layer, start=sparse * keep)

    def _admm_again(self, weight, hessian, keep, layer, structure):
        """ADMM's sparse weights as prune had them: run again under the step's structure
        (its rows are independent, so a layer alone gives the rows it had stacked with
        others), with the per-row (or the layer's) pruned counts taken from `keep`, where a
        sparsity profile's allocation left them."""
        if structure is None:
            raise ValueError(f"{layer or 'a layer'}: ADMM's refit is recomputed under the step's structure; none given")
        if structure.n_m is None:
            structure = Structure(structure.sparsity, None, structure.scope, int(keep.numel() - keep.sum()))
        return admm_prune(weight, hessian, structure, self.dampening, self.admm)[1]

    def options(self):
        return {"sensitivity": self.sensitivity, "normalize": self.normalize, "reduce": self.reduce,
                "reconstruct": self.reconstruct, "refit": self.refit, "blocksize": self.blocksize,
                "dampening": self.dampening, "refit_iterations": self.pcg.iterations, "solve": self.solve,
                "mask": self.mask, "refit_start": self.refit_start,
                "admm_iterations": self.admm.iterations}

    def finish_block(self):
        self.factors.clear()
        if self.second_order is not None:
            self.second_order.finish_block()

    def model_statistic(self, model, batches, device, names):
        return loss_gradient_statistic(model, batches, device, names)

    def combine(self, previous, fresh):
        if self.reconstruct:  # each part normalised by its own scale, as copal and sparsegpt do alone
            sensitivity, hessian = split_hessian(fresh)
            if self.normalize:
                fresh = torch.cat([_normalised(sensitivity, OutputSensitivity.scale(sensitivity)),
                                   _normalised(hessian, Hessian.scale(hessian))])
            return accumulate(previous, fresh, None, self.reduce)
        return accumulate(previous, fresh, self._scale(fresh) if self.normalize else None, self.reduce)
