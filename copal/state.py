"""What a continual step records, and reading it back.

    RUN_DIR/steps/K/step.json                    the step's record (domain, fingerprint, PPLs, …)
    RUN_DIR/steps/K/masks.safetensors            keep-masks of every pruned layer, bit-packed
    RUN_DIR/steps/K/sensitivity/block-NNNN.safetensors   accumulated statistic (accumulate regime)
    RUN_DIR/steps/K/weights/block-NNNN.safetensors       reconstructed weights (sparsegpt only)

Per-block files keep memory bounded: a step never holds more than one block's
statistics or weights. A step is written under `steps/.K.partial` and renamed
into place when complete, so a step directory is either whole or absent.
"""

import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from copal import masks as maskio
from copal.atomic import write_atomic
from copal.errors import InputError
from copal.model import DenseWeights


def write_json(path: Path, payload) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    write_atomic(path, json.dumps(payload, indent=1) + "\n")


def read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InputError(f"{path}: {what} is corrupt (not valid JSON)") from None


def _block_file(index: int) -> str:
    return f"block-{index:04d}.safetensors"


class _BlockedTensors:
    """Tensors saved one file per block, with an index name → file."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.pending: dict[str, torch.Tensor] = {}
        self.index: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        if any(tensor.data_ptr() == other.data_ptr() for other in self.pending.values()):
            tensor = tensor.clone()  # layers may share a statistic; a file holds each tensor once
        self.pending[name] = tensor

    def flush(self, block: int) -> None:
        if not self.pending:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        save_file(self.pending, str(self.folder / _block_file(block)))
        self.index.update({name: _block_file(block) for name in self.pending})
        self.pending = {}

    def close(self) -> None:
        if self.index:
            write_json(self.folder / "index.json", self.index)


class StepWriter:
    """Collects one step's masks, statistics and weights under a partial directory."""

    def __init__(self, steps_dir: Path, step_id: int):
        self.final = steps_dir / str(step_id)
        self.partial = steps_dir / f".{step_id}.partial"
        if self.partial.exists():
            shutil.rmtree(self.partial)  # left by a crashed attempt
        self.partial.mkdir(parents=True)
        self.packed_masks: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, list[int]] = {}
        self.nonzero: dict[str, int] = {}
        self.sensitivity = _BlockedTensors(self.partial / "sensitivity")
        self.weights = _BlockedTensors(self.partial / "weights")

    def add_mask(self, name: str, mask: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Record a layer's keep-mask, bit-packed from the start (a bool mask costs a
        byte per weight), and the weight the layer ends with: its zeros are the
        layer's sparsity, which can exceed the mask's (SparseGPT zeroes the weights
        of inputs that never fired, and the mask may keep some of them). Without
        `weight`, the mask's pruned bits are counted."""
        self.packed_masks[name] = maskio.pack(mask)
        self.shapes[name] = list(mask.shape)
        self.nonzero[name] = int(mask.sum()) if weight is None else int((weight != 0).sum())  # ≈3× count_nonzero's speed

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of zeros in each layer's final weight."""
        return {name: 1.0 - self.nonzero[name] / math.prod(shape) for name, shape in self.shapes.items()}

    def overall_sparsity(self) -> float:
        """Fraction of zeros over all pruned layers' final weights."""
        return 1.0 - sum(self.nonzero.values()) / sum(math.prod(shape) for shape in self.shapes.values())

    def finish_block(self, index: int) -> None:
        self.sensitivity.flush(index)
        self.weights.flush(index)

    def commit(self, record: dict) -> Path:
        # One metadata key: safetensors writes a metadata map in arbitrary order,
        # and the file must be byte-identical for the same masks.
        shapes = json.dumps(self.shapes, sort_keys=True)
        save_file(self.packed_masks, str(self.partial / "masks.safetensors"), metadata={"shapes": shapes})
        self.sensitivity.close()
        self.weights.close()
        write_json(self.partial / "step.json", record)
        os.replace(self.partial, self.final)
        return self.final


class StepState:
    """A recorded step, read lazily (one tensor at a time)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.record = read_json(folder / "step.json", "step record")
        self._indexes: dict[str, dict[str, str]] = {}

    @property
    def id(self) -> int:
        return self.record["step"]

    def _open(self, file: Path):
        try:
            return safe_open(str(file), "pt")
        except (SafetensorError, OSError) as error:
            raise InputError(f"{file}: corrupt snapshot file ({error})") from None

    def verify(self) -> None:
        """Open every tensor file of the step: a corrupt snapshot is an InputError now,
        not half-way through the next step."""
        for file in sorted(self.folder.rglob("*.safetensors")):
            with self._open(file) as handle:
                for name in handle.keys():
                    handle.get_slice(name)

    def mask_names(self) -> list[str]:
        with self._open(self.folder / "masks.safetensors") as handle:
            return list(handle.keys())

    def mask(self, name: str) -> torch.Tensor:
        path = self.folder / "masks.safetensors"
        with self._open(path) as handle:
            try:
                shape = tuple(json.loads(handle.metadata()["shapes"])[name])
                return maskio.unpack(handle.get_tensor(name), shape)
            except (KeyError, SafetensorError, ValueError) as error:
                raise InputError(f"{path}: no valid mask for {name} ({error})") from None

    def _index(self, kind: str) -> dict[str, str]:
        """Layer name → block file of `kind`, read once per step (every layer asks)."""
        if kind not in self._indexes:
            index_path = self.folder / kind / "index.json"
            self._indexes[kind] = read_json(index_path, f"{kind} index") if index_path.exists() else {}
        return self._indexes[kind]

    def _blocked(self, kind: str, name: str) -> torch.Tensor | None:
        index = self._index(kind)
        if name not in index:
            return None
        path = self.folder / kind / index[name]
        with self._open(path) as handle:
            try:
                return handle.get_tensor(name)
            except SafetensorError as error:
                raise InputError(f"{path}: corrupt snapshot file ({error})") from None

    def sensitivity(self, name: str) -> torch.Tensor | None:
        return self._blocked("sensitivity", name)

    def weight(self, name: str, dense: DenseWeights) -> torch.Tensor:
        """The layer's weight after this step: stored weights, else W0 ⊙ mask."""
        stored = self._blocked("weights", name)
        if stored is not None:
            return stored
        base = dense.get(name)
        return base * self.mask(name).to(base.dtype)
