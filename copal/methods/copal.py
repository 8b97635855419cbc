"""COPAL (Malla et al., ICML 2024): |W| times a sensitivity accumulated across domains.

Two sensitivities (METHOD.md): `output`, |∂(½‖y‖²)/∂W| summed per token, from
each layer's own input and output during the layer-wise pass; and `loss`, the
language-model loss's gradient |∂L/∂W|, which needs a backward pass through the
whole model. `normalize` and `reduce` say how domains combine.
"""

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from copal.methods.base import Method, Statistic, accumulate
from copal.model import all_prunable, weight_matrix


class OutputSensitivity(Statistic):
    """S_ij = Σ_tokens |y_i|·|x_j| = (|Y|ᵀ|X|)_ij: the magnitude of ∂(½‖y‖²)/∂W_ij
    summed per token."""

    @staticmethod
    def value_shape(out_features, in_features):
        return (out_features, in_features)

    def add(self, inputs, y):
        self.value.addmm_(y.abs().t(), inputs.abs)


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


class Copal(Method):
    name = "copal"

    def __init__(self, sensitivity: str = "output", normalize: bool = True, reduce: str = "sum"):
        self.sensitivity = sensitivity
        self.normalize = normalize
        self.reduce = reduce
        self.statistic = OutputSensitivity if sensitivity == "output" else None
        self.whole_model = sensitivity == "loss"

    @classmethod
    def from_config(cls, config):
        return cls(**config.copal.model_dump())

    def score(self, weight, stat):
        return weight.abs() * stat

    def model_statistic(self, model, batches, device, names):
        return loss_gradient_statistic(model, batches, device, names)

    def combine(self, previous, fresh):
        return accumulate(previous, fresh, self._scale(fresh) if self.normalize else None, self.reduce)
