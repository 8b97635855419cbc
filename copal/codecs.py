"""How the accumulated statistic of a step is stored: the state codecs.

The accumulate regime records C_t for the next step. An elementwise statistic
(COPAL's: one non-negative value per weight) can be kept in a compact form;
every step then reads C_{t-1} back through the same decoding, live and in
replay, so replay stays bit-identical. A block file names its format in its
safetensors metadata (FORMAT_KEY); a file without it is float32, as every run
wrote before compact formats existed. `CODECS` is the registry of formats (the
config's `state.format`)."""

import math
import zlib

import numpy as np
import torch
from torch import nn

from copal import masks as maskio
from copal.errors import InputError

FORMAT_KEY = "copal_state_format"
STATE_VERSION = 1


class StateCodec:
    """Float32 as it is: no metadata, one tensor per layer (the format of older runs)."""

    name = "float32"
    bits = 32.0
    live_roundtrip = False  # True: the step uses its statistic as decoded from the stored form

    def encode(self, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        """The tensors to store, on `value`'s device."""
        return {name: value.detach().float().contiguous()}

    def decode(self, name: str, get) -> torch.Tensor:
        """`get(key)`: a tensor of the block file."""
        return get(name).float()

    def keys(self, name: str) -> list[str]:
        """The keys `store` gives for `name`."""
        return [name]

    def store(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a block file holds of `encode`'s tensors (CPU tensors, on the writer's
        thread, off the pruning pass): as they are, unless a codec packs them further."""
        return tensors


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


class SymmetricHalf16(StateCodec):
    """A symmetric (in, in) statistic (an accumulated Hessian H = Σ x xᵀ) as its upper
    triangle in float16, scaled so that max|H| maps to 2¹⁵: half the entries at 16 bits,
    8 bits an entry of H, relative error ≤ 2⁻¹¹ down to 2⁻²⁴ max|H| (float16's normal
    range). reports/refit_owl.md measured the float16 half below calibration noise
    (SparseGPT mask agreement 99.5 % at 50 %, refit objective +0.005 %), where 8-bit
    forms leave H indefinite.

    `live_roundtrip`: the step prunes with the decoded value, so that its weights are
    recomputed from the stored state bit for bit (copal.state.StepState.weight)."""

    name = "sym16"
    bits = 8.0
    live_roundtrip = True

    def keys(self, name):
        return [f"{name}.upper", f"{name}.scale"]

    def encode(self, name, value):
        value = value.detach().float()
        if value.dim() != 2 or value.shape[0] != value.shape[1]:
            raise ValueError(f"{name}: {self.name} stores a square statistic, got shape {tuple(value.shape)}")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name}: {self.name} stores a finite statistic")
        rows, cols = torch.triu_indices(*value.shape, device=value.device)
        peak = value.abs().max()
        scale = torch.where(peak > 0, peak / 2 ** 15, torch.ones_like(peak)).reshape(1)
        return {f"{name}.upper": (value[rows, cols] / scale).to(torch.float16), f"{name}.scale": scale}

    def decode(self, name, get):
        return _symmetric(get(f"{name}.upper"), get(f"{name}.scale"))

    def roundtrip(self, name: str, value: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The tensors to store (on the CPU) and what decoding them gives (on `value`'s
        device): encoded once, for the step to use and for the writer to store."""
        encoded = {key: part.cpu() for key, part in self.encode(name, value).items()}
        return encoded, _symmetric(encoded[f"{name}.upper"], encoded[f"{name}.scale"]).to(value.device)


def _symmetric(upper: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from its upper triangle (row-major) and scale."""
    size = (math.isqrt(8 * upper.numel() + 1) - 1) // 2
    rows, cols = torch.triu_indices(size, size)
    full = torch.zeros(size, size)
    full[rows, cols] = upper.float() * scale.float()
    return full + full.triu(1).t()


class SymmetricHalf16Zip(SymmetricHalf16):
    """sym16's float16 upper triangle, stored losslessly compressed: its high bytes
    (sign, exponent, top mantissa bits: few distinct values) then its low bytes, deflated
    (zlib). It decodes to exactly sym16's matrix, so a run prunes alike in either format.
    On SmolLM2's Hessians this stores 0.87x sym16's bytes (about 14 bits an upper entry),
    which takes a step's files under half the fp16 bytes of the prunable weights; deflating
    one block's Hessians takes ~0.2 s, on the writer's thread."""

    name = "sym16z"
    bits = 7.0
    LEVEL = 6  # zlib's default: level 9 stored the same bytes on SmolLM2's Hessians, slower

    def keys(self, name):
        return [f"{name}.zipped", f"{name}.scale"]

    def store(self, tensors):
        stored = {}
        for key, tensor in tensors.items():
            if key.endswith(".upper"):
                halves = tensor.contiguous().view(torch.uint8).reshape(-1, 2).t()  # (low, high) byte rows
                packed = zlib.compress(halves.flip(0).contiguous().numpy().tobytes(), self.LEVEL)
                stored[key.removesuffix(".upper") + ".zipped"] = torch.frombuffer(bytearray(packed), dtype=torch.uint8)
            else:
                stored[key] = tensor
        return stored

    def decode(self, name, get):
        try:
            raw = zlib.decompress(get(f"{name}.zipped").numpy().tobytes())
        except zlib.error as error:
            raise InputError(f"{name}: corrupt {self.name} state ({error})") from None
        entries = len(raw) // 2
        size = (math.isqrt(8 * entries + 1) - 1) // 2
        if len(raw) % 2 or size * (size + 1) // 2 != entries:
            raise InputError(f"{name}: corrupt {self.name} state ({len(raw)} bytes is no upper triangle)")
        high_low = torch.frombuffer(bytearray(raw), dtype=torch.uint8).reshape(2, -1)
        upper = high_low.flip(0).t().contiguous().view(torch.float16).reshape(-1)
        return _symmetric(upper, get(f"{name}.scale"))


# Per-weight statistics (the config's `state.format`) and symmetric ones (`state.hessian`).
CODECS: dict[str, StateCodec] = {codec.name: codec for codec in
                                 (StateCodec(), BFloat16Codec(), LogCodec(256), LogCodec(16), LogCodec(8), LogCodec(6))}
HESSIAN_CODECS: dict[str, StateCodec] = {codec.name: codec for codec in
                                         (CODECS["float32"], SymmetricHalf16(), SymmetricHalf16Zip())}
_READABLE = CODECS | HESSIAN_CODECS
STATE_FORMATS = tuple(_READABLE)


def codec_for(label: str) -> StateCodec:
    """The codec a block file's FORMAT_KEY names ("log3/v1"), float32 without one."""
    name, _, version = label.partition("/v")
    if name not in _READABLE or (version and int(version) > STATE_VERSION):
        raise InputError(f"unknown state format {label!r} (this copal reads {', '.join(STATE_FORMATS)}, "
                         f"version ≤ {STATE_VERSION})")
    return _READABLE[name]
