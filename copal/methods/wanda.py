"""Wanda (Sun et al., 2024): |W_ij| · ‖X_j‖, the weight times its input column's norm."""

from copal.methods.base import Method, Statistic


class InputEnergy(Statistic):
    """Σ x_j² per input column."""

    input_only = True

    @staticmethod
    def value_shape(out_features, in_features):
        return (in_features,)

    def add(self, inputs, y):
        self.value += inputs.x.square().sum(0)


class Wanda(Method):
    name = "wanda"
    statistic = InputEnergy

    def score(self, weight, stat):
        return weight.abs() * stat.sqrt().unsqueeze(0)
