"""What a continual step records, and reading it back.

    RUN_DIR/steps/K/step.json                    the step's record (domain, fingerprint, PPLs, …)
    RUN_DIR/steps/K/masks.safetensors            keep-masks of every pruned layer, bit-packed
    RUN_DIR/steps/K/sensitivity/block-NNNN.safetensors   accumulated statistic (accumulate regime),
                                                 in the format its metadata names (see StateCodec)
    RUN_DIR/steps/K/weights/block-NNNN.safetensors       reconstructed weights (sparsegpt only)

Per-block files keep memory bounded: a step never holds more than one block's
statistics or weights. A step is written under `steps/.K.partial` and renamed
into place when complete, so a step directory is either whole or absent.
step.json, written last, records the SHA-256 of every other file of the step
(`files`); readers check them (`StepState.verify`) before trusting the step.
"""

import json
import logging
import math
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from copal import masks as maskio
from copal.atomic import write_atomic
from copal.codecs import CODECS, FORMAT_KEY, STATE_VERSION, StateCodec, codec_for
from copal.digests import check_digests, tree_digests
from copal.errors import InputError
from copal.model import DenseWeights
from copal.records import StepRecord

log = logging.getLogger("copal")


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


class _InOrder:
    """One worker thread that runs what a step writes (state encoding, file writes) in
    submission order, so they overlap the pass's next block instead of stalling it.
    `wait` returns when everything submitted is done and raises the first failure."""

    def __init__(self):
        self._pool: ThreadPoolExecutor | None = None
        self._futures: list[Future] = []

    def submit(self, function, *args) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="copal-step-writer")
        future = self._pool.submit(function, *args)
        self._futures.append(future)
        return future

    def wait(self) -> None:
        futures, self._futures = self._futures, []
        for future in futures:
            future.result()

    def close(self) -> None:
        """Wait for everything, failures ignored (an abandoned step), and stop the thread."""
        for future in self._futures:
            future.exception()
        self._futures = []
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


class _BlockedTensors:
    """Tensors saved one file per block, with an index name → file. A layer's
    tensor may be stored encoded (a StateCodec); the file then names its format
    in its metadata, and holds the codec's tensors for the layer.

    Encoding and writing run on the step's `_InOrder` worker; a block's file is
    written while the next block computes, and `flush` waits for the block before
    it, so at most two blocks' tensors wait in memory."""

    def __init__(self, folder: Path, worker: _InOrder):
        self.folder = folder
        self.worker = worker
        self.pending: list[Future | dict[str, torch.Tensor]] = []
        self.pending_names: list[str] = []
        self.pending_format: str | None = None  # None: plain tensors (float32 or the weights' dtype)
        self.index: dict[str, str] = {}
        self._last_write: Future | None = None

    def add(self, name: str, tensor: torch.Tensor, codec: StateCodec | None = None) -> None:
        label = None if codec is None or codec.name == "float32" else f"{codec.name}/v{STATE_VERSION}"
        if self.pending_names and label != self.pending_format:
            raise RuntimeError(f"{name}: one block file holds one state format "
                               f"({self.pending_format or 'float32'} already, {label or 'float32'} given)")
        self.pending_format = label
        self.pending_names.append(name)
        if label is not None:  # encoded on the compute device, by the worker: the pass goes on meanwhile
            self.pending.append(self.worker.submit(_encoded, codec, name, tensor.detach()))
            return
        tensor = tensor.detach().to("cpu").contiguous()
        plain = [item for item in self.pending if isinstance(item, dict)]
        if any(tensor.data_ptr() == other.data_ptr() for item in plain for other in item.values()):
            tensor = tensor.clone()  # layers may share a statistic; a file holds each tensor once
        self.pending.append({name: tensor})

    def flush(self, block: int) -> None:
        if not self.pending:
            return
        if self._last_write is not None:
            self._last_write.result()  # the block before: written, its memory free
        metadata = {FORMAT_KEY: self.pending_format} if self.pending_format else None
        self._last_write = self.worker.submit(self._write, self.pending, _block_file(block), metadata)
        self.index.update({name: _block_file(block) for name in self.pending_names})
        self.pending, self.pending_names, self.pending_format = [], [], None

    def _write(self, items: list, file: str, metadata: dict | None) -> None:
        tensors = {}
        for item in items:
            tensors.update(item.result() if isinstance(item, Future) else item)
        self.folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(self.folder / file), metadata=metadata)

    def close(self) -> None:
        if self.index:
            write_json(self.folder / "index.json", self.index)


def _encoded(codec: StateCodec, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    return {key: part.to("cpu") for key, part in codec.encode(name, tensor).items()}


class StepWriter:
    """Collects one step's masks, statistics and weights under a partial directory."""

    def __init__(self, steps_dir: Path, step_id: int, state_format: str = "float32"):
        """`state_format`: how a new lineage's accumulated statistic is stored
        (copal.codecs.CODECS; the config's `state.format`)."""
        self.state_format = state_format
        self.final = steps_dir / str(step_id)
        self.partial = steps_dir / f".{step_id}.partial"
        if self.partial.exists():
            shutil.rmtree(self.partial)  # left by a crashed attempt
        self.partial.mkdir(parents=True)
        self.packed_masks: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, list[int]] = {}
        self.nonzero: dict[str, int] = {}
        self.worker = _InOrder()
        self.sensitivity = _BlockedTensors(self.partial / "sensitivity", self.worker)
        self.weights = _BlockedTensors(self.partial / "weights", self.worker)

    def add_mask(self, name: str, mask: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Record a layer's keep-mask, bit-packed from the start (a bool mask costs a
        byte per weight), and the weight the layer ends with: its zeros are the
        layer's sparsity, which can exceed the mask's (SparseGPT zeroes the weights
        of inputs that never fired, and the mask may keep some of them). Without
        `weight`, the mask's pruned bits are counted."""
        self.packed_masks[name] = maskio.pack(mask).to("cpu")
        self.shapes[name] = list(mask.shape)
        self.nonzero[name] = int(mask.sum()) if weight is None else int((weight != 0).sum())  # ≈3× count_nonzero's speed

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of zeros in each layer's final weight."""
        return {name: 1.0 - self.nonzero[name] / math.prod(shape) for name, shape in self.shapes.items()}

    def overall_sparsity(self) -> float:
        """Fraction of zeros over all pruned layers' final weights."""
        return 1.0 - sum(self.nonzero.values()) / sum(math.prod(shape) for shape in self.shapes.values())

    def weight(self, name: str, dense: DenseWeights) -> torch.Tensor:
        """The layer's weight after this step, before it is committed (what
        StepState.weight reads back afterwards): its reconstructed weight if it
        wrote one, else W0 ⊙ mask."""
        stored = self.weights.index.get(name)
        if stored is not None:
            self.worker.wait()
            with safe_open(str(self.weights.folder / stored), "pt") as handle:
                return handle.get_tensor(name)
        base = dense.get(name)
        return base * maskio.unpack(self.packed_masks[name], tuple(self.shapes[name])).to(base.dtype)

    def finish_block(self, index: int) -> None:
        self.sensitivity.flush(index)
        self.weights.flush(index)

    def commit(self, record: StepRecord) -> Path:
        """Write the masks and indexes, then step.json: `record` with every file's SHA-256
        (`files`), and rename the step into place; on failure nothing is left."""
        try:
            self.worker.wait()
            self.worker.close()
            # One metadata key: safetensors writes a metadata map in arbitrary order,
            # and the file must be byte-identical for the same masks.
            shapes = json.dumps(self.shapes, sort_keys=True)
            save_file(self.packed_masks, str(self.partial / "masks.safetensors"), metadata={"shapes": shapes})
            self.sensitivity.close()
            self.weights.close()
            record = record.model_copy(update={"files": tree_digests(self.partial)})
            write_json(self.partial / "step.json", record.as_json())
            os.replace(self.partial, self.final)
        except BaseException:
            self.discard()
            raise
        return self.final

    def discard(self) -> None:
        """Remove the partial step (a failed or abandoned attempt), once nothing writes into it."""
        self.worker.close()
        shutil.rmtree(self.partial, ignore_errors=True)


def _read_record(path: Path, required: tuple[str, ...]) -> StepRecord:
    """step.json as a StepRecord; an InputError if it is not one or lacks a `required` key."""
    raw = read_json(path, "step record")
    if not isinstance(raw, dict) or any(key not in raw for key in required):
        raise InputError(f"{path}: corrupt step record (lacks one of {', '.join(required)})")
    try:
        return StepRecord.model_validate(raw)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise InputError(f"{path}: corrupt step record ({where}: {problem['msg']})") from None


class StepState:
    """A recorded step, read lazily (one tensor at a time)."""

    def __init__(self, folder: Path, required: tuple[str, ...] = ("step", "parent")):
        """`required`: the keys step.json must hold (else an InputError)."""
        self.folder = folder
        self.record = _read_record(folder / "step.json", required)
        if folder.name.isdigit() and self.record.step != int(folder.name):
            raise InputError(f"{folder / 'step.json'}: records step {self.record.step!r}, not {folder.name}")
        self._indexes: dict[str, dict[str, str]] = {}
        self._verified = False

    @property
    def id(self) -> int:
        return self.record.step

    def _open(self, file: Path):
        try:
            return safe_open(str(file), "pt")
        except (SafetensorError, OSError) as error:
            raise InputError(f"{file}: corrupt snapshot file ({error})") from None

    @property
    def has_digests(self) -> bool:
        return self.record.files is not None

    def verify(self) -> None:
        """Check every file against the SHA-256 step.json records: a changed or corrupt
        file is an InputError naming it now, not a silently different result later.
        A step recorded before digests existed gets its tensor files opened instead."""
        if self._verified:
            return
        if self.has_digests:
            check_digests(self.folder, self.record.files)
        else:
            log.debug("step %s was recorded without file digests (an older copal): its files are only "
                      "checked to be readable", self.id)
            for file in sorted(self.folder.rglob("*.safetensors")):
                with self._open(file) as handle:
                    for name in handle.keys():
                        handle.get_slice(name)
        self._verified = True

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

    def _blocked(self, kind: str, name: str) -> tuple[torch.Tensor, StateCodec] | None:
        index = self._index(kind)
        if name not in index:
            return None
        path = self.folder / kind / index[name]
        with self._open(path) as handle:
            try:
                label = (handle.metadata() or {}).get(FORMAT_KEY)
                codec = codec_for(label) if label else CODECS["float32"]
                if kind == "weights":
                    return handle.get_tensor(name), codec
                return codec.decode(name, handle.get_tensor), codec
            except SafetensorError as error:
                raise InputError(f"{path}: corrupt snapshot file ({error})") from None
            except InputError as error:
                raise InputError(f"{path}: {error}") from None

    def sensitivity(self, name: str) -> torch.Tensor | None:
        """The accumulated statistic this step recorded for `name`, as float32,
        decoded from its stored format (None: none recorded)."""
        found = self._blocked("sensitivity", name)
        if found is None:
            return None
        if not torch.isfinite(found[0]).all():
            raise InputError(f"{self.folder / 'sensitivity' / self._index('sensitivity')[name]}: the recorded "
                             f"state of {name} holds NaN or Inf")
        return found[0]

    def state_format(self, name: str) -> str | None:
        """The format `name`'s accumulated statistic is stored in (None: none recorded)."""
        index = self._index("sensitivity")
        if name not in index:
            return None
        with self._open(self.folder / "sensitivity" / index[name]) as handle:
            label = (handle.metadata() or {}).get(FORMAT_KEY)
        return codec_for(label).name if label else "float32"

    def weight(self, name: str, dense: DenseWeights) -> torch.Tensor:
        """The layer's weight after this step: stored weights, else W0 ⊙ mask."""
        stored = self._blocked("weights", name)
        if stored is not None:
            return stored[0]
        base = dense.get(name)
        return base * self.mask(name).to(base.device, base.dtype)
