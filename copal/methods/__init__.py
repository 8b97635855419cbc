"""Pruning methods, one module each: a statistic accumulated over calibration
tokens plus a score (copal.methods.base), and the method's options model when it
has options. Adding a method is one module here and its line in `METHODS`: the
config's `method` choices and the bench grid's are these names (a method with
options also adds its section to copal.config's RunConfig)."""

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
