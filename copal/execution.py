"""Where a run's model lives while it is pruned and evaluated: resident in memory,
or streamed from its checkpoint one decoder block at a time (copal.streaming).

Both give the step and the evaluation the same interface: the model skeleton and
tokenizer, W0 (`dense`), the blocks as a copal.blocks.BlockSource, `perplexity`,
and which prunable weights an evaluation sees (`show_dense`, `holds_step`)."""

import torch

from copal import metrics
from copal.blocks import ResidentBlocks
from copal.model import DTYPES, DenseWeights, all_prunable, load_model, set_weight_matrix
from copal.streaming import BlockStream, WeightSource, load_streaming, streamed_perplexity


class Resident:
    """The whole model in memory: a step's pass writes its weights into it."""

    streamed = False

    def __init__(self, model, tokenizer, location: str):
        self.model, self.tokenizer = model, tokenizer
        self.dense = DenseWeights(model, location)
        self.blocks = ResidentBlocks(model)

    def perplexity(self, windows: torch.Tensor, device: torch.device, batch_size: int) -> tuple[float, int]:
        return metrics.perplexity(self.model, windows, device, batch_size)

    def show_dense(self) -> None:
        """W0 back into the model (it may hold a pruned step's weights)."""
        for name, module in all_prunable(self.model).items():
            set_weight_matrix(module, self.dense.get(name))

    def holds_step(self, weights: WeightSource) -> None:
        """Nothing to do: the pass that computed the step wrote its weights into the model."""

    def holds_state(self, state) -> None:
        """Nothing to do (as `holds_step`): a recorded step (copal.state.StepState)."""


class Streamed:
    """Only the non-block tensors in memory; each block read from the checkpoint when its turn comes."""

    streamed = True

    def __init__(self, model, tokenizer, stream: BlockStream, location: str):
        self.model, self.tokenizer = model, tokenizer
        self.dense = DenseWeights(model, location)
        self.blocks = stream

    def perplexity(self, windows: torch.Tensor, device: torch.device, batch_size: int) -> tuple[float, int]:
        return streamed_perplexity(self.model, self.blocks, windows, device, batch_size)

    def show_dense(self) -> None:
        self.blocks.use_weights(None)

    def holds_step(self, weights: WeightSource) -> None:
        """Evaluate with `weights` (a step's: its masks over W0, or its reconstructed weights)."""
        self.blocks.use_weights(weights)

    def holds_state(self, state) -> None:
        """Evaluate with a recorded step's weights (copal.state.StepState.weight)."""
        self.holds_step(lambda name: state.weight(name, self.dense))


def open_execution(location: str, dtype: str, trust_remote_code: bool, stream: bool) -> Resident | Streamed:
    """Streamed if `stream` and the checkpoint allows it (copal.streaming.load_streaming), else resident."""
    loaded = load_streaming(location, DTYPES[dtype], trust_remote_code) if stream else None
    if loaded is not None:
        model, tokenizer, blocks = loaded
        return Streamed(model, tokenizer, blocks, location)
    model, tokenizer = load_model(location, dtype, trust_remote_code)
    return Resident(model, tokenizer, location)
