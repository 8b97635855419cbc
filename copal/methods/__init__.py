"""Pruning methods, one module each: a statistic accumulated over calibration
tokens plus a score (copal.methods.base). Adding a method is one module here
and its line in `METHODS` (and its name in copal.config's `method` choices)."""

from copal.methods.base import LayerInput, Method, Statistic, accumulate
from copal.methods.copal import Copal, OutputSensitivity
from copal.methods.magnitude import Magnitude
from copal.methods.sparsegpt import Hessian, SparseGPT
from copal.methods.wanda import InputEnergy, Wanda

METHODS: dict[str, type[Method]] = {method.name: method for method in (Magnitude, Wanda, SparseGPT, Copal)}


def build_method(config) -> Method:
    """The config's method with its options (config.copal, config.sparsegpt)."""
    return METHODS[config.method].from_config(config)


__all__ = ["METHODS", "Copal", "Hessian", "InputEnergy", "LayerInput", "Magnitude", "Method", "OutputSensitivity",
           "SparseGPT", "Statistic", "Wanda", "accumulate", "build_method"]
