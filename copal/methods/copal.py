"""COPAL (Malla et al., ICML 2024): |W| times a sensitivity accumulated across domains.

Two sensitivities (docs/METHOD.md): `output`, |∂(½‖y‖²)/∂W| summed per token, from
each layer's own input and output during the layer-wise pass; and `loss`, the
language-model loss's gradient |∂L/∂W|, which needs a backward pass through the
whole model. `normalize` and `reduce` say how domains combine. `reconstruct`
keeps COPAL's mask and refits the kept weights from the Hessian accumulated the
same way (`refit`: SparseGPT's OBS update, or conjugate gradient).
"""

from typing import Literal

import torch
from pydantic import model_validator
from torch import nn
from transformers.pytorch_utils import Conv1D

from copal.masks import Structure, select_mask
from copal.methods.base import Method, Statistic, accumulate
from copal.methods.sparsegpt import Hessian
from copal.obs import InverseFactors, resolved_solve, sparsegpt_prune
from copal.model import all_prunable, weight_matrix
from copal.options import Strict
from copal.refit import PCGOptions, refit as refit_kept


class CopalOptions(Strict):
    """The config's `copal:` section: the variants of docs/METHOD.md; the defaults
    are the measured best."""

    sensitivity: Literal["output", "loss"] = "output"
    normalize: bool = True
    reduce: Literal["sum", "max"] = "sum"
    # `reconstruct`: COPAL's mask, then a refit of the kept weights from the accumulated
    # Hessian (the `sparsegpt:` section's blocksize and dampening), by `refit`: `obs`,
    # SparseGPT's one-pass update; `pcg`, conjugate gradient towards the least-squares
    # optimum on the fixed mask (ALPS's refit; copal.refit).
    reconstruct: bool = False
    refit: Literal["obs", "pcg"] = "obs"

    @model_validator(mode="after")
    def _reconstruct_needs_layer_statistics(self) -> "CopalOptions":
        if self.reconstruct and self.sensitivity == "loss":
            raise ValueError("reconstruct accumulates each layer's Hessian in the layer-wise pass; "
                             "it needs sensitivity: output")
        if self.refit != "obs" and not self.reconstruct:
            raise ValueError(f"refit: {self.refit} refits from the accumulated Hessian; it needs reconstruct: true")
        if self.reconstruct and self.reduce == "max":
            raise ValueError("reconstruct sums Hessians over domains (an elementwise max of Hessians is not one); "
                             "it needs reduce: sum")
        return self


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

    def __init__(self, sensitivity: str = "output", normalize: bool = True, reduce: str = "sum",
                 reconstruct: bool = False, refit: str = "obs", blocksize: int = 128, dampening: float = 0.01,
                 refit_iterations: int = 20, solve: str = "auto"):
        self.sensitivity = sensitivity
        self.normalize = normalize
        self.reduce = reduce
        self.reconstruct = reconstruct
        self.refit = refit
        self.blocksize, self.dampening = blocksize, dampening  # the reconstruction's (SparseGPT's)
        self.pcg = PCGOptions(iterations=refit_iterations)
        self.solve = solve
        self.factors = InverseFactors()
        if sensitivity == "loss":
            self.statistic = None
        else:
            self.statistic = SensitivityAndHessian if reconstruct else OutputSensitivity
        self.whole_model = sensitivity == "loss"

    @classmethod
    def from_config(cls, config):
        return cls(**config.copal.model_dump(), blocksize=config.sparsegpt.blocksize,
                   dampening=config.sparsegpt.dampening, refit_iterations=config.sparsegpt.refit_iterations,
                   solve=config.sparsegpt.solve)

    def score(self, weight, stat):
        return weight.abs() * stat

    def prune(self, weight, stat, structure, forced_prune=None, layer=None):
        if not self.reconstruct:
            return super().prune(weight, stat, structure, forced_prune, layer)
        sensitivity, _ = split_hessian(stat)
        keep = select_mask(self.score(weight.float(), sensitivity), structure, forced_prune)
        return keep, self.reweight(weight, stat, keep, layer)

    def reweight(self, weight, stat, keep, layer=None):
        if not self.reconstruct:
            return None
        _, hessian = split_hessian(stat)
        if self.refit == "pcg":
            return refit_kept(weight, hessian, keep, "pcg", self.dampening, self.pcg, self.blocksize, layer)
        return sparsegpt_prune(weight, hessian, Structure(0.0), None, self.blocksize, self.dampening, layer, keep,
                               self.factors, resolved_solve(self.solve, weight.device))[1]

    def options(self):
        return {"sensitivity": self.sensitivity, "normalize": self.normalize, "reduce": self.reduce,
                "reconstruct": self.reconstruct, "refit": self.refit, "blocksize": self.blocksize,
                "dampening": self.dampening, "refit_iterations": self.pcg.iterations, "solve": self.solve}

    def finish_block(self):
        self.factors.clear()

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
