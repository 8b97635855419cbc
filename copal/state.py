"""What a continual step records, and reading it back.

    RUN_DIR/steps/K/step.json                    the step's record (domain, fingerprint, PPLs, …)
    RUN_DIR/steps/K/masks.safetensors            keep-masks of every pruned layer, bit-packed
    RUN_DIR/steps/K/sensitivity/block-NNNN.safetensors   accumulated statistic (accumulate regime),
                                                 in the format its metadata names (see StateCodec)
    RUN_DIR/steps/K/sensitivity/aliases.json     layers that share another's statistic (q/k/v, gate/up)
    RUN_DIR/steps/K/sensitivity/energy.safetensors   Σx² per token of every layer, accumulated
                                                 (sparsity_profile: owl under accumulate; copal.profiles)
    RUN_DIR/steps/K/weights/block-NNNN.safetensors       reconstructed weights (sparsegpt, copal
                                                 reconstruct) where no recorded state recomputes them

Per-block files keep memory bounded: a step never holds more than one block's
statistics or weights. Under accumulate a step's reconstructed weights are not
kept: the record names the method (`reweight`) that recomputes them, bit for bit,
from W0, the mask and the recorded state (`StepState.weight`). A step is written under `steps/.K.partial` and renamed
into place when complete, so a step directory is either whole or absent.
step.json, written last, records the SHA-256 of every other file of the step
(`files`); readers check them (`StepState.verify`) before trusting the step.
"""

import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from copal import masks as maskio
from copal.atomic import write_atomic
from copal.blockfiles import BlockedTensors, InOrder
from copal.codecs import CODECS, FORMAT_KEY, StateCodec, codec_for
from copal.digests import check_digests, tree_digests
from copal.errors import InputError
from copal.methods import METHODS
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


class StepWriter:
    """Collects one step's masks, statistics and weights under a partial directory."""

    def __init__(self, steps_dir: Path, step_id: int, state_format: str = "float32",
                 hessian_format: str = "float32"):
        """`state_format`, `hessian_format`: how a new lineage's accumulated per-weight
        statistic and Hessian are stored (copal.codecs.CODECS and HESSIAN_CODECS; the
        config's `state.format` and `state.hessian`)."""
        self.state_format = state_format
        self.hessian_format = hessian_format
        self.final = steps_dir / str(step_id)
        self.partial = steps_dir / f".{step_id}.partial"
        if self.partial.exists():
            shutil.rmtree(self.partial)  # left by a crashed attempt
        self.partial.mkdir(parents=True)
        self.packed_masks: dict[str, torch.Tensor] = {}
        self.shapes: dict[str, list[int]] = {}
        self.nonzero: dict[str, int] = {}
        self.worker = InOrder()
        self.sensitivity = BlockedTensors(self.partial / "sensitivity", self.worker)
        self.weights = BlockedTensors(self.partial / "weights", self.worker)
        self.reweight: dict | None = None  # set by `recompute_weights`
        self.energy: dict[str, torch.Tensor] | None = None  # OWL's accumulated Σx² per token (copal.profiles)

    def recompute_weights(self, method) -> None:
        """The step's weights are recomputed from its state by `method` (Method.reweight)
        wherever they are read: the step keeps them only until it is committed.
        None: they are stored (as steps recorded before recomputing existed)."""
        self.reweight = None if method is None else {"method": method.name, "options": method.options()}

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
            if self.energy:
                self.sensitivity.folder.mkdir(exist_ok=True)
                save_file({name: value.contiguous() for name, value in self.energy.items()},
                          str(self.sensitivity.folder / ENERGY_FILE))
            update = {}
            if self.reweight is not None and self.weights.index:
                shutil.rmtree(self.weights.folder, ignore_errors=True)
                update["reweight"] = self.reweight
            record = record.model_copy(update=update | {"files": tree_digests(self.partial)})
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


ENERGY_FILE = "energy.safetensors"


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
        self._method = None  # the method that recomputes the weights (record.reweight)

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

    def aliases(self, kind: str) -> dict[str, str]:
        """Layer → the layer whose stored tensor it shares (older steps: none)."""
        key = f"{kind}/aliases"
        if key not in self._indexes:
            path = self.folder / kind / "aliases.json"
            self._indexes[key] = read_json(path, f"{kind} aliases") if path.exists() else {}
        return self._indexes[key]

    def _blocked(self, kind: str, name: str) -> tuple[torch.Tensor, StateCodec] | None:
        index = self._index(kind)
        if name not in index:
            return None
        path = self.folder / kind / index[name]
        key = self.aliases(kind).get(name, name)
        with self._open(path) as handle:
            try:
                label = (handle.metadata() or {}).get(FORMAT_KEY)
                codec = codec_for(label) if label else CODECS["float32"]
                if kind == "weights":
                    return handle.get_tensor(key), codec
                return codec.decode(key, handle.get_tensor), codec
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

    def energy(self, name: str) -> torch.Tensor | None:
        """OWL's accumulated Σx² per token of `name` (None: the step recorded none)."""
        path = self.folder / "sensitivity" / ENERGY_FILE
        if not path.exists():
            return None
        with self._open(path) as handle:
            return handle.get_tensor(name) if name in handle.keys() else None

    def state_format(self, name: str) -> str | None:
        """The format `name`'s accumulated statistic is stored in (None: none recorded)."""
        index = self._index("sensitivity")
        if name not in index:
            return None
        with self._open(self.folder / "sensitivity" / index[name]) as handle:
            label = (handle.metadata() or {}).get(FORMAT_KEY)
        return codec_for(label).name if label else "float32"

    def weight(self, name: str, dense: DenseWeights) -> torch.Tensor:
        """The layer's weight after this step: stored weights; else recomputed from W0,
        the mask and the recorded state by the method the record names (`reweight`);
        else W0 ⊙ mask."""
        stored = self._blocked("weights", name)
        if stored is not None:
            return stored[0]
        base = dense.get(name)
        keep = self.mask(name).to(base.device)
        if self.record.reweight is not None:
            recomputed = self._reweigher().reweight(base, self._state_on(name, base.device), keep, name,
                                                    self.structure())
            if recomputed is not None:
                return recomputed.to(base.dtype)
        return base * keep.to(base.dtype)

    def structure(self) -> maskio.Structure | None:
        """The structure the step pruned under (None: its record does not say). A sparsity
        profile's per-layer counts are not in it: a layer's mask holds them."""
        record = self.record
        if record.structure is None or record.sparsity_target is None:
            return None
        return maskio.Structure(record.sparsity_target, maskio.parse_structure(record.structure),
                                record.mask_scope or "row")

    def _reweigher(self):
        if self._method is None:
            spec = self.record.reweight
            try:
                self._method = METHODS[spec["method"]].from_options(spec["options"])
            except (KeyError, TypeError):
                raise InputError(f"{self.folder / 'step.json'}: corrupt step record (reweight: {spec!r})") from None
        return self._method

    def _state_on(self, name: str, device: torch.device) -> torch.Tensor:
        value = self.sensitivity(name)
        if value is None:
            raise InputError(f"{self.folder}: its weights are recomputed from its state, which has none for {name}")
        return value.to(device)
