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
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from copal import masks as maskio
from copal.atomic import write_atomic
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


# ---------------------------------------------------------------- compact state
#
# The accumulate regime records C_t for the next step. An elementwise statistic
# (COPAL's: one non-negative value per weight) can be kept in a compact form;
# every step then reads C_{t-1} back through the same decoding, live and in
# replay, so replay stays bit-identical. A block file names its format in its
# safetensors metadata (FORMAT_KEY); a file without it is float32, as every run
# wrote before compact formats existed.

FORMAT_KEY = "copal_state_format"
STATE_VERSION = 1


class StateCodec:
    """Float32 as it is: no metadata, one tensor per layer (the format of older runs)."""

    name = "float32"
    bits = 32.0

    def encode(self, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors to store, on `value`'s device."""
        return {name: value.detach().float().contiguous()}

    def decode(self, name: str, get) -> torch.Tensor:
        """`get(key)`: a tensor of the block file."""
        return get(name).float()

    def keys(self, name: str) -> list[str]:
        return [name]


class BFloat16Codec(StateCodec):
    """bfloat16: 8 bits of exponent, 7 of mantissa (relative error ≤ 2⁻⁸)."""

    name = "bfloat16"
    bits = 16.0

    def encode(self, name, value):
        return {name: value.detach().to(torch.bfloat16).contiguous()}


def _codes_per_byte(levels: int) -> int:
    """How many codes of `levels` values one byte holds (base-`levels` digits)."""
    count = 1
    while levels ** (count + 1) <= 256:
        count += 1
    return count


def _pack_codes(codes: torch.Tensor, levels: int) -> torch.Tensor:
    """Codes < levels, packed on their own device: a power of two as log2(levels) bit
    planes, each bit-packed (log2(levels)/8 bytes a code); other counts as
    base-`levels` digits, as many to a byte as fit (6 levels: 3 a byte, 8/3 bits a code)."""
    flat = codes.reshape(-1).to(torch.int32)
    if levels & (levels - 1) == 0:
        return torch.cat([maskio.pack((flat >> p) & 1) for p in range(levels.bit_length() - 1)])
    per_byte = _codes_per_byte(levels)
    digits = nn.functional.pad(flat, (0, -flat.numel() % per_byte)).reshape(-1, per_byte)
    return (digits * levels ** torch.arange(per_byte, dtype=torch.int32, device=flat.device)).sum(1).to(torch.uint8)


def _unpack_codes(packed: torch.Tensor, levels: int, count: int) -> torch.Tensor:
    if levels & (levels - 1) == 0:
        bits = levels.bit_length() - 1
        planes = packed.numpy().reshape(bits, -1)
        codes = np.zeros(count, dtype=np.int64)
        for p in range(bits):
            codes |= np.unpackbits(planes[p], count=count).astype(np.int64) << p
        return torch.from_numpy(codes)
    per_byte = _codes_per_byte(levels)
    values = packed.numpy().astype(np.int64)[:, None] // levels ** np.arange(per_byte) % levels
    return torch.from_numpy(values.reshape(-1)[:count])


def _level_of(values: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """`torch.bucketize(values, bounds)` (int32) for sorted bounds: how many bounds
    each value exceeds. With few bounds, one comparison pass per bound is about 3x
    faster than a binary search per value."""
    if bounds.numel() > 15:
        return torch.bucketize(values, bounds, out_int32=True)
    level = torch.zeros(values.shape, dtype=torch.int32, device=values.device)
    for bound in bounds:
        level += values > bound
    return level


def _sums_by_level(values: torch.Tensor, levels: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Σ values per level (float64). On the CPU index_add_ sums in order; on a GPU it would
    add atomically in any order, so there the values are sorted by level (stably) and each
    level's sum is a difference of prefix sums: the same every time."""
    if values.device.type == "cpu":
        return torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, levels, values)
    prefix = torch.cat([values.new_zeros(1), values[torch.argsort(levels, stable=True)].cumsum(0)])
    ends = counts.cumsum(0)
    return prefix[ends] - prefix[ends - counts]


class LogCodec(StateCodec):
    """A non-negative (out, in) statistic as C_ij ≈ r_i · c_j · table[code_ij].

    r_i and c_j are the geometric means of row i and column j, in bfloat16
    (their rounding goes into the ratios; the statistic is close to rank one in
    the log domain: |Y|ᵀ|X| for independent |y|, |x|); what is left,
    log2(C_ij / (r_i c_j)), is quantised to `levels` values by a 1-D k-means
    (Lloyd, or an even `grid`) fitted per layer, and each level
    decodes to the linear mean of the ratios it holds (a level's sum is
    unbiased). Codes take log2(levels) bits, or for other counts 8/k bits with
    k base-`levels` digits a byte (6 levels: 8/3 bits).

    Error bound (tests/test_compact_state.py): a positive entry decodes to
    r_i · c_j · t where t lies between the smallest and the largest ratio of
    its level, so |log2(decoded / C)| ≤ the width of that level. Rows or
    columns that are all zero decode to exact zeros; an isolated zero decodes
    to the lowest level.

    Decoding is products of values read from the file, in float32 (the outer
    product r ⊗ c, then × table[code]), so it gives the same bits everywhere."""

    def __init__(self, levels: int, grid: str = "lloyd", iterations: int = 12, fit_sample: int = 1 << 20):
        self.levels = levels
        self.bits = math.log2(levels) if levels & (levels - 1) == 0 else 8 / _codes_per_byte(levels)
        self.grid = grid
        self.iterations = iterations
        self.fit_sample = fit_sample
        name = f"{int(self.bits)}" if levels & (levels - 1) == 0 else f"{levels}L"
        self.name = f"log{name}" + ("" if grid == "lloyd" else f"-{grid}")

    def keys(self, name):
        return [f"{name}.codes", f"{name}.rows", f"{name}.cols", f"{name}.table"]

    def _centres(self, residual: torch.Tensor) -> torch.Tensor:
        """Lloyd's 1-D k-means on a strided sample, started at its quantiles.

        On the sorted sample every level is a contiguous run, so an iteration is a
        binary search per boundary and a difference of prefix sums: O(levels · log n)
        instead of a pass over the sample (a 1 M-value layer: 12 iterations in
        microseconds, where bucketize + index_add_ took 0.3 s). Each level's mean is the
        same as summing its values one by one, up to float64 rounding."""
        device = residual.device
        if self.grid == "uniform":
            return torch.linspace(float(residual.min()), float(residual.max()), self.levels, dtype=torch.float64,
                                  device=device)
        step = max(1, residual.numel() // self.fit_sample)
        if device.type == "cpu":  # numpy's sort: ~3x torch's on the CPU
            sample = torch.from_numpy(np.sort(residual[::step].numpy())).double()
        else:
            sample = residual[::step].sort().values.double()
        # torch.quantile's linear interpolation, on the sample already sorted (it would sort again)
        ranks = (torch.arange(self.levels, dtype=torch.float64, device=device) + 0.5) / self.levels
        ranks = ranks * (sample.numel() - 1)
        below = ranks.long()
        centres = torch.lerp(sample[below], sample[ranks.ceil().long()], ranks - below)
        prefix = torch.cat([torch.zeros(1, dtype=torch.float64, device=device), sample.cumsum(0)])
        first, last = torch.zeros(1, dtype=torch.long, device=device), torch.tensor([sample.numel()], device=device)
        for _ in range(self.iterations):
            # bucketize's levels: level k holds bounds[k-1] < x <= bounds[k]
            ends = torch.searchsorted(sample, (centres[1:] + centres[:-1]) / 2, right=True)
            edges = torch.cat([first, ends, last])
            counts = (edges[1:] - edges[:-1]).double()
            sums = prefix[edges[1:]] - prefix[edges[:-1]]
            centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
        return centres

    def encode(self, name, value):
        """Encoded on `value`'s device (the writer moves the result to the CPU)."""
        value = value.detach().float()
        if value.dim() != 2:
            raise ValueError(f"{name}: {self.name} stores a 2-D statistic, got shape {tuple(value.shape)}")
        if not torch.isfinite(value).all() or (value < 0).any():
            raise ValueError(f"{name}: {self.name} stores a finite non-negative statistic")
        positive = value > 0
        logs = torch.where(positive, value.clamp(min=torch.finfo(torch.float32).tiny).log2(), 0)
        row_count = positive.sum(1)
        row_log = logs.sum(1) / row_count.clamp(min=1)
        col_count = positive.sum(0)
        col_log = torch.where(positive, logs - row_log[:, None], 0).sum(0) / col_count.clamp(min=1)
        rows = torch.where(row_count > 0, torch.exp2(row_log), 0.0).to(torch.bfloat16)
        cols = torch.where(col_count > 0, torch.exp2(col_log), 0.0).to(torch.bfloat16)
        base = rows.float()[:, None] * cols.float()[None, :]  # decode's product: the ratios are what it scales
        live = positive & (base > 0)
        ratio = torch.where(live, value / torch.where(base > 0, base, 1.0), 0.0)
        everywhere = bool(live.all())  # the usual case: skip the masked gathers and the scatter
        live_ratio = ratio.reshape(-1) if everywhere else ratio[live]
        residual = live_ratio.clamp(min=torch.finfo(torch.float32).tiny).log2()
        codes = torch.zeros(value.shape, dtype=torch.uint8, device=value.device)
        if residual.numel() == 0:
            table = torch.ones(self.levels, device=value.device)
        else:
            centres = self._centres(residual)
            chosen = _level_of(residual, ((centres[1:] + centres[:-1]) / 2).float())
            if everywhere:
                codes = chosen.to(torch.uint8).reshape(value.shape)
            else:
                codes[live] = chosen.to(torch.uint8)
            counts = torch.bincount(chosen, minlength=self.levels)
            sums = _sums_by_level(live_ratio.double(), chosen, counts)
            counts = counts.double()
            table = torch.where(counts > 0, sums / counts.clamp(min=1), torch.exp2(centres)).float()
        return {f"{name}.codes": _pack_codes(codes, self.levels), f"{name}.rows": rows.contiguous(),
                f"{name}.cols": cols.contiguous(), f"{name}.table": table.contiguous()}

    def decode(self, name, get):
        rows, cols, table = get(f"{name}.rows").float(), get(f"{name}.cols").float(), get(f"{name}.table")
        codes = _unpack_codes(get(f"{name}.codes"), self.levels, rows.numel() * cols.numel())
        return (rows[:, None] * cols[None, :]) * table[codes].reshape(rows.numel(), cols.numel())


CODECS: dict[str, StateCodec] = {codec.name: codec for codec in
                                 (StateCodec(), BFloat16Codec(), LogCodec(256), LogCodec(16), LogCodec(8), LogCodec(6))}
STATE_FORMATS = tuple(CODECS)


def codec_for(label: str) -> StateCodec:
    """The codec a block file's FORMAT_KEY names ("log3/v1"), float32 without one."""
    name, _, version = label.partition("/v")
    if name not in CODECS or (version and int(version) > STATE_VERSION):
        raise InputError(f"unknown state format {label!r} (this copal reads {', '.join(STATE_FORMATS)}, "
                         f"version ≤ {STATE_VERSION})")
    return CODECS[name]


class _BlockedTensors:
    """Tensors saved one file per block, with an index name → file. A layer's
    tensor may be stored encoded (a StateCodec); the file then names its format
    in its metadata, and holds the codec's tensors for the layer."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_names: list[str] = []
        self.pending_format: str | None = None  # None: plain tensors (float32 or the weights' dtype)
        self.index: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor, codec: StateCodec | None = None) -> None:
        label = None if codec is None or codec.name == "float32" else f"{codec.name}/v{STATE_VERSION}"
        if self.pending_names and label != self.pending_format:
            raise RuntimeError(f"{name}: one block file holds one state format "
                               f"({self.pending_format or 'float32'} already, {label or 'float32'} given)")
        self.pending_format = label
        self.pending_names.append(name)
        if label is not None:  # encoded now, on the compute device: the float32 value need not wait
            self.pending.update({key: part.to("cpu") for key, part in codec.encode(name, tensor).items()})
            return
        tensor = tensor.detach().to("cpu").contiguous()
        if any(tensor.data_ptr() == other.data_ptr() for other in self.pending.values()):
            tensor = tensor.clone()  # layers may share a statistic; a file holds each tensor once
        self.pending[name] = tensor

    def flush(self, block: int) -> None:
        if not self.pending:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        metadata = {FORMAT_KEY: self.pending_format} if self.pending_format else None
        save_file(self.pending, str(self.folder / _block_file(block)), metadata=metadata)
        self.index.update({name: _block_file(block) for name in self.pending_names})
        self.pending, self.pending_names, self.pending_format = {}, [], None

    def close(self) -> None:
        if self.index:
            write_json(self.folder / "index.json", self.index)


class StepWriter:
    """Collects one step's masks, statistics and weights under a partial directory."""

    def __init__(self, steps_dir: Path, step_id: int, state_format: str = "float32"):
        """`state_format`: how a new lineage's accumulated statistic is stored
        (copal.state.CODECS; the config's `state.format`)."""
        self.state_format = state_format
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
        self.packed_masks[name] = maskio.pack(mask).to("cpu")
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

    def commit(self, record: StepRecord) -> Path:
        """Write the masks and indexes, then step.json: `record` with every file's SHA-256
        (`files`), and rename the step into place; on failure nothing is left."""
        try:
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
        """Remove the partial step (a failed or abandoned attempt)."""
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
