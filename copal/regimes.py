"""Regimes: what the weights and the statistic are at step t, one class each.

| regime     | base weights       | statistic used for the score          | calibration data |
|------------|--------------------|---------------------------------------|------------------|
| sequential | W_{t-1} (pruned)   | S_t; pruned weights stay pruned        | D_t              |
| reprune    | W0                 | S_t                                    | D_t              |
| accumulate | W0                 | C_t = C_{t-1} ⊕ S_t/scale(S_t)         | D_t              |
| joint      | W0                 | S over the pooled data of D_1..D_t     | D_1..D_t         |

A regime answers the step's questions (which domains to calibrate on, the base
weight, the statistic, what must stay pruned); `copal.step` asks them. Adding a
regime is one class here and its line in `REGIMES`, whose names are the
config's `regime` choices.
"""

from typing import TypeVar

import torch

from copal.methods import Method
from copal.model import DenseWeights
from copal.codecs import codec_for
from copal.state import StepState, StepWriter

T = TypeVar("T")


class Regime:
    """A regime's answers; these defaults are reprune's (W0, this step's statistic alone)."""

    name: str
    # True: each step records its statistic (the state the next step continues from); a
    # method's reconstructed weights are then recomputed from it rather than stored.
    records_state = False

    def calibration_domains(self, current: T, seen: list[T]) -> list[T]:
        """The domains whose calibration data this step uses: `current`, given the
        domains its lineage has already stepped on (`seen`, in run order)."""
        return [current]

    def base_weight(self, name: str, dense: DenseWeights, parent: StepState | None) -> torch.Tensor:
        return dense.get(name)

    def forced_prune(self, name: str, parent: StepState | None) -> torch.Tensor | None:
        """Positions that must be pruned whatever their score (None: none)."""
        return None

    def statistic(self, name: str, fresh: torch.Tensor | None, method: Method, parent: StepState | None,
                  writer: StepWriter) -> torch.Tensor | None:
        """The statistic the score uses, from this step's `fresh` one."""
        return fresh

    def share_statistic(self, names: list[str], owner: str, writer: StepWriter) -> None:
        """`names` read the same input as `owner` and use its input-only statistic (q/k/v,
        gate/up): whatever the regime records of it is recorded once, under `owner`."""


class Reprune(Regime):
    """Prune W0 afresh with this domain's statistic."""

    name = "reprune"


class Sequential(Regime):
    """Prune the previous step's model: pruned weights stay pruned (weight stasis)."""

    name = "sequential"

    def base_weight(self, name, dense, parent):
        return parent.weight(name, dense) if parent is not None else dense.get(name)

    def forced_prune(self, name, parent):
        return ~parent.mask(name) if parent is not None else None


class Accumulate(Regime):
    """Prune W0 with the statistic accumulated over every domain so far (COPAL's
    regime); the accumulated statistic is recorded for the next step.

    The mask uses C_t = combine(C_{t-1}, S_t) in float32, with C_{t-1} as the
    parent step stored it (decoded from its format, in a live run as in a
    replay); C_t is stored in the lineage's format: the parent's, so a lineage
    never changes format (runs begun before compact formats stay float32), or
    for a first step the writer's (the config's `state.format` for a per-weight
    statistic, `state.hessian` for a Hessian). Other statistics are stored in
    float32. A codec with `live_roundtrip` gives the step C_t as decoded from
    its stored form, so that weights recomputed from the state are the step's."""

    name = "accumulate"
    records_state = True

    def statistic(self, name, fresh, method, parent, writer):
        if fresh is None:
            return None
        previous = parent.sensitivity(name) if parent is not None else None
        combined = method.combine(previous, fresh)
        if previous is not None:
            state_format = parent.state_format(name)
        elif method.compact_state:
            state_format = writer.state_format
        elif method.symmetric_state:
            state_format = writer.hessian_format
        else:
            state_format = "float32"
        codec = codec_for(state_format)
        if codec.live_roundtrip:
            encoded, combined = codec.roundtrip(name, combined)
            writer.sensitivity.add(name, combined, codec, encoded)
        else:
            writer.sensitivity.add(name, combined, codec)
        return combined

    def share_statistic(self, names, owner, writer):
        writer.sensitivity.alias(names, owner)


class Joint(Regime):
    """Prune W0 with the statistic of every domain's data pooled: keeps past data,
    so an upper reference rather than a continual method."""

    name = "joint"

    def calibration_domains(self, current, seen):
        return [domain for domain in seen if domain is not current] + [current]


REGIMES: dict[str, Regime] = {regime.name: regime() for regime in (Sequential, Reprune, Accumulate, Joint)}
