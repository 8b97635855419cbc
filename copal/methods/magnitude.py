"""Magnitude pruning: keep the largest |W|. Uses no calibration data."""

from copal.methods.base import Method


class Magnitude(Method):
    name = "magnitude"

    def score(self, weight, stat):
        return weight.abs()
