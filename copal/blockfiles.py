"""The tensor files of a step (copal.state.StepWriter's `sensitivity/` and `weights/`):
one safetensors file per block, an index layer → file, and the layers that share
another's tensor (aliases); encoded and written on one background worker so the
layer-wise pass goes on meanwhile."""

import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from copal.atomic import write_atomic
from copal.codecs import FORMAT_KEY, STATE_VERSION, StateCodec


def _write_json(path: Path, payload) -> None:
    write_atomic(path, json.dumps(payload, indent=1) + "\n")


def _block_file(index: int) -> str:
    return f"block-{index:04d}.safetensors"


class InOrder:
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


class BlockedTensors:
    """Tensors saved one file per block, with an index name → file. A layer's
    tensor may be stored encoded (a StateCodec); the file then names its format
    in its metadata, and holds the codec's tensors for the layer.

    Encoding and writing run on the step's `InOrder` worker; a block's file is
    written while the next block computes, and `flush` waits for the block before
    it, so at most two blocks' tensors wait in memory."""

    def __init__(self, folder: Path, worker: InOrder):
        self.folder = folder
        self.worker = worker
        self.pending: list[Future | dict[str, torch.Tensor]] = []
        self.pending_names: list[str] = []
        self.pending_format: str | None = None  # None: plain tensors (float32 or the weights' dtype)
        self.pending_codec: StateCodec | None = None
        self.index: dict[str, str] = {}
        self.aliases: dict[str, str] = {}  # layer → the layer whose tensor it shares (same file)
        self._pending_aliases: dict[str, str] = {}
        self._last_write: Future | None = None

    def add(self, name: str, tensor: torch.Tensor, codec: StateCodec | None = None,
            encoded: dict[str, torch.Tensor] | None = None) -> None:
        """`tensor` to store under `name`, in `codec`'s format; `encoded`: what the
        codec's `encode` gave for it, where the caller has encoded it already (on the CPU)."""
        label = None if codec is None or codec.name == "float32" else f"{codec.name}/v{STATE_VERSION}"
        if self.pending_names and label != self.pending_format:
            raise RuntimeError(f"{name}: one block file holds one state format "
                               f"({self.pending_format or 'float32'} already, {label or 'float32'} given)")
        self.pending_format, self.pending_codec = label, codec
        self.pending_names.append(name)
        if label is not None:  # unless the caller has, encoded on the compute device by the worker meanwhile
            self.pending.append(encoded if encoded is not None else
                                self.worker.submit(_encoded, codec, name, tensor.detach()))
            return
        tensor = tensor.detach().to("cpu").contiguous()
        plain = [item for item in self.pending if isinstance(item, dict)]
        if any(tensor.data_ptr() == other.data_ptr() for item in plain for other in item.values()):
            tensor = tensor.clone()  # layers may share a statistic; a file holds each tensor once
        self.pending.append({name: tensor})

    def alias(self, names: list[str], owner: str) -> None:
        """`names` share `owner`'s tensor, added to this block: stored once, under `owner`."""
        if owner not in self.pending_names:
            raise RuntimeError(f"{owner}: shared before it was added to the block")
        self._pending_aliases.update({name: owner for name in names})

    def flush(self, block: int) -> None:
        if not self.pending:
            return
        if self._last_write is not None:
            self._last_write.result()  # the block before: written, its memory free
        metadata = {FORMAT_KEY: self.pending_format} if self.pending_format else None
        self._last_write = self.worker.submit(self._write, self.pending, _block_file(block), metadata,
                                              self.pending_codec if self.pending_format else None)
        self.index.update({name: _block_file(block) for name in self.pending_names + list(self._pending_aliases)})
        self.aliases.update(self._pending_aliases)
        self.pending, self.pending_names, self.pending_format, self.pending_codec = [], [], None, None
        self._pending_aliases = {}

    def _write(self, items: list, file: str, metadata: dict | None, codec: StateCodec | None) -> None:
        tensors = {}
        for item in items:
            tensors.update(item.result() if isinstance(item, Future) else item)
        if codec is not None:
            tensors = codec.store(tensors)
        self.folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(self.folder / file), metadata=metadata)

    def close(self) -> None:
        if self.index:
            _write_json(self.folder / "index.json", self.index)
        if self.aliases:
            _write_json(self.folder / "aliases.json", self.aliases)


def _encoded(codec: StateCodec, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    return {key: part.to("cpu") for key, part in codec.encode(name, tensor).items()}
