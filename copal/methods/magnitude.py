"""Magnitude pruning: keep the largest |W|. Uses no calibration data, unless
`magnitude: {refit: obs | pcg}` rebuilds the kept weights from the accumulated
Hessian (copal.methods.refitted)."""

from copal.methods.refitted import MaskThenRefit


class Magnitude(MaskThenRefit):
    name = "magnitude"

    def score(self, weight, stat):
        return weight.abs()
