"""Wanda (Sun et al., 2024): |W_ij| · ‖X_j‖, the weight times its input column's norm.
`wanda: {refit: obs | pcg}` rebuilds the kept weights from the accumulated Hessian
(copal.methods.refitted)."""

from copal.methods.base import Statistic
from copal.methods.refitted import MaskThenRefit, input_energy


class InputEnergy(Statistic):
    """Σ x_j² per input column."""

    input_only = True

    @staticmethod
    def value_shape(out_features, in_features):
        return (in_features,)

    def add(self, inputs, y):
        self.value += inputs.x.square().sum(0)


class Wanda(MaskThenRefit):
    name = "wanda"
    statistic = InputEnergy

    def score(self, weight, stat):
        return weight.abs() * input_energy(stat).clamp(min=0).sqrt().unsqueeze(0)
