"""Compact step state (copal.state's codecs): a round trip of every format, its
documented error bound, the files a step writes, old float32 steps still read,
and a compact run's step 2 replaying bit-identically."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import small_config

OUTPUT = {"sensitivity": "output"}  # copal's per-weight statistic: what state.format compacts
from copal.config import build_config
from copal.errors import InputError
from copal.methods import Copal, Wanda
from copal.regimes import REGIMES
from copal.codecs import CODECS, FORMAT_KEY, LogCodec, _level_of, _pack_codes, _unpack_codes
from copal.records import StepRecord
from copal.state import StepState, StepWriter


def _statistic(rows=96, cols=80, seed=0) -> torch.Tensor:
    """Non-negative, close to rank one in the log domain, over many octaves, with
    an all-zero row and column (dead inputs / outputs)."""
    generator = torch.Generator().manual_seed(seed)
    value = torch.rand(rows, 1, generator=generator) * 20 * torch.rand(1, cols, generator=generator)
    value = (value + torch.randn(rows, cols, generator=generator)).exp2()
    value[3] = 0
    value[:, 5] = 0
    return value


def _plain_lloyd(sample: torch.Tensor, levels: int, iterations: int) -> torch.Tensor:
    """The textbook fit the codec speeds up: assign every value, average each level."""
    centres = torch.quantile(sample, (torch.arange(levels, dtype=torch.float64) + 0.5) / levels)
    for _ in range(iterations):
        index = torch.bucketize(sample, (centres[1:] + centres[:-1]) / 2)
        sums = torch.zeros(levels, dtype=torch.float64).index_add_(0, index, sample)
        counts = torch.bincount(index, minlength=levels).double()
        centres = torch.where(counts > 0, sums / counts.clamp(min=1), centres)
    return centres


@pytest.mark.parametrize("levels", [6, 8, 256])
@pytest.mark.parametrize("values", ["skewed", "4-bit grid"])
def test_fast_lloyd_fit_and_levels_are_the_plain_algorithms(levels, values):
    """The encoder's sorted-sample Lloyd (prefix sums) and comparison-count levels are
    speed-ups, not approximations: the same centres up to float64 rounding, the same
    level for every value (ties on a bound included), from a strided sample too."""
    generator = torch.Generator().manual_seed(levels)
    if values == "skewed":
        residual = torch.randn(60_000, generator=generator) * 2 + torch.rand(60_000, generator=generator).log()
    else:  # many exact ties, some on a boundary between two levels
        residual = torch.randint(-8, 8, (60_000,), generator=generator).float() / 4
    codec = LogCodec(levels, fit_sample=20_000)  # every 3rd value
    fitted = codec._centres(residual)
    assert torch.allclose(fitted, _plain_lloyd(residual[::3].double(), levels, codec.iterations), rtol=0, atol=1e-12)
    bounds = ((fitted[1:] + fitted[:-1]) / 2).float()
    assert torch.equal(_level_of(residual, bounds), torch.bucketize(residual, bounds, out_int32=True))


@pytest.mark.parametrize("name", ["float32", "bfloat16", "log8", "log4", "log3", "log6L"])
def test_encode_decode_is_deterministic(name):
    codec, value = CODECS[name], _statistic()
    first, second = codec.encode("layer", value), codec.encode("layer", value.clone())
    assert first.keys() == second.keys() == set(codec.keys("layer"))
    assert all(torch.equal(first[key], second[key]) for key in first)
    decoded = codec.decode("layer", first.__getitem__)
    assert decoded.dtype == torch.float32 and decoded.shape == value.shape
    assert torch.equal(decoded, codec.decode("layer", dict(first).__getitem__))
    assert (decoded[3] == 0).all() and (decoded[:, 5] == 0).all()  # zero rows and columns stay exact zeros


@pytest.mark.parametrize("levels", [256, 16, 8, 6, 5, 3])
@pytest.mark.parametrize("count", [1, 7, 8, 24, 1001])
def test_codes_pack_and_unpack(levels, count):
    codes = torch.randint(0, levels, (count,), generator=torch.Generator().manual_seed(count))
    packed = _pack_codes(codes, levels)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(count * LogCodec(levels).bits / 8 - 1e-9) \
        or levels & (levels - 1) == 0  # bit planes: each plane rounds up to a byte
    assert torch.equal(_unpack_codes(packed, levels, count), codes)


@pytest.mark.parametrize("levels,median", [(256, 0.02), (16, 0.2), (8, 0.35), (6, 0.45)])
def test_log_codec_size_and_error_bound(levels, median):
    """A positive entry decodes to r_i·c_j·t with t between the smallest and the
    largest ratio C/(r_i·c_j) of its level; storage is `bits` per weight plus
    the row and column factors and the table."""
    codec, value = LogCodec(levels), _statistic()
    stored = codec.encode("w", value)
    rows, cols, table = stored["w.rows"].float(), stored["w.cols"].float(), stored["w.table"]
    assert stored["w.codes"].numel() == math.ceil(codec.bits * value.numel() / 8) and table.numel() == levels
    decoded = codec.decode("w", stored.__getitem__)
    codes = _unpack_codes(stored["w.codes"], levels, value.numel()).reshape(value.shape)
    ratio = value / (rows[:, None] * cols[None, :])
    positive = value > 0
    for level in codes[positive].unique():
        held = ratio[positive & (codes == level)]
        assert held.min() * (1 - 1e-6) <= table[level] <= held.max() * (1 + 1e-6)
    widths = {int(level): float((ratio[positive & (codes == level)].max() / ratio[positive & (codes == level)].min()).log2())
              for level in codes[positive].unique()}
    error = (decoded[positive] / value[positive]).log2().abs()
    bound = torch.tensor([widths[int(level)] for level in codes[positive]]) + 1e-5
    assert (error <= bound).all()
    assert error.median() < median  # more levels, smaller error


def test_bfloat16_relative_error():
    value = _statistic()
    decoded = CODECS["bfloat16"].decode("w", CODECS["bfloat16"].encode("w", value).__getitem__)
    positive = value > 0
    assert ((decoded[positive] - value[positive]).abs() / value[positive]).max() <= 2 ** -8


def test_log_codec_rejects_what_it_cannot_store():
    with pytest.raises(ValueError, match="non-negative"):
        LogCodec(8).encode("w", -_statistic())
    with pytest.raises(ValueError, match="2-D"):
        LogCodec(8).encode("w", torch.ones(5))


def _write_step(tmp_path, step_id, values: dict, state_format: str):
    writer = StepWriter(tmp_path / "steps", step_id, state_format)
    for name, value in values.items():
        writer.sensitivity.add(name, value, CODECS[state_format])
        writer.add_mask(name, value > value.median())
    writer.finish_block(0)
    return StepState(writer.commit(StepRecord(step=step_id, parent=step_id - 1)))


@pytest.mark.parametrize("name", ["float32", "bfloat16", "log3"])
def test_step_files_round_trip_and_name_their_format(tmp_path, name):
    values = {"a.q_proj": _statistic(seed=1), "a.up_proj": _statistic(48, 80, seed=2)}
    state = _write_step(tmp_path, 1, values, name)
    file = tmp_path / "steps/1/sensitivity/block-0000.safetensors"
    with safe_open(str(file), "pt") as handle:
        metadata = handle.metadata() or {}
    assert metadata.get(FORMAT_KEY) == (None if name == "float32" else f"{name}/v1")
    for layer, value in values.items():
        expected = CODECS[name].decode(layer, CODECS[name].encode(layer, value).__getitem__)
        assert torch.equal(state.sensitivity(layer), expected)
        assert state.state_format(layer) == name
    assert json.loads((tmp_path / "steps/1/sensitivity/index.json").read_text()) == {
        layer: "block-0000.safetensors" for layer in values}
    assert state.sensitivity("missing") is None and state.state_format("missing") is None


def test_float32_steps_of_older_runs_still_read(tmp_path):
    """A step written before compact formats: plain float32 tensors, no metadata."""
    folder = tmp_path / "steps/1"
    (folder / "sensitivity").mkdir(parents=True)
    value = _statistic()
    save_file({"l": value}, str(folder / "sensitivity/block-0000.safetensors"))
    (folder / "sensitivity/index.json").write_text(json.dumps({"l": "block-0000.safetensors"}))
    (folder / "step.json").write_text(json.dumps({"step": 1, "parent": 0}))
    state = StepState(folder)
    assert torch.equal(state.sensitivity("l"), value) and state.state_format("l") == "float32"


def test_unknown_format_is_an_input_error(tmp_path):
    folder = tmp_path / "steps/1"
    (folder / "sensitivity").mkdir(parents=True)
    save_file({"l": torch.ones(2, 2)}, str(folder / "sensitivity/block-0000.safetensors"),
              metadata={FORMAT_KEY: "log1/v9"})
    (folder / "sensitivity/index.json").write_text(json.dumps({"l": "block-0000.safetensors"}))
    (folder / "step.json").write_text(json.dumps({"step": 1, "parent": 0}))
    with pytest.raises(InputError, match="unknown state format 'log1/v9'"):
        StepState(folder).sensitivity("l")


def test_a_lineage_keeps_its_format_and_only_elementwise_statistics_compact(tmp_path):
    """Accumulate stores C_t in the parent's format (a float32 lineage stays
    float32 whatever the config says), a first step in the writer's; Wanda's (in,)
    statistic is always float32."""
    from copal.methods import METHODS

    compact = {name: METHODS[name]().compact_state for name in METHODS}
    assert compact == {"magnitude": False, "wanda": False, "sparsegpt": False, "copal": False}  # copal: a Hessian
    assert Copal(sensitivity="output").compact_state and Copal(sensitivity="loss").compact_state
    assert not Copal(sensitivity="output", reconstruct=True).compact_state
    assert Copal().symmetric_state and not Copal(sensitivity="output").symmetric_state
    accumulate = REGIMES["accumulate"]
    fresh = _statistic(seed=3)
    legacy = _write_step(tmp_path / "old", 1, {"l": _statistic(seed=4)}, "float32")
    output = Copal(sensitivity="output")
    cases = ((legacy, output, "float32"), (None, output, "log3"), (None, Wanda(), "float32"))
    for case, (parent, method, expected) in enumerate(cases):
        writer = StepWriter(tmp_path / "new" / str(case), 2, "log3")
        stat = fresh if method.compact_state else fresh[0]
        combined = accumulate.statistic("l", stat, method, parent, writer)
        if parent is not None:
            assert torch.equal(combined, output.combine(parent.sensitivity("l"), fresh))  # float32, decoded parent
        writer.finish_block(0)
        assert StepState(writer.commit(StepRecord(step=2, parent=1))).state_format("l") == expected


def test_config_state_format(tmp_path, llama_dir, corpus_dir):
    assert build_config(small_config(llama_dir, corpus_dir)).state.format == "log6L"
    assert build_config(small_config(llama_dir, corpus_dir, state={"format": "log3"})).state.format == "log3"
    with pytest.raises(InputError, match="state.format"):
        build_config(small_config(llama_dir, corpus_dir, state={"format": "zip"}))
    with pytest.raises(InputError, match="unknown key"):
        build_config(small_config(llama_dir, corpus_dir, state={"bits": 3}))


def test_compact_run_replays_bit_identically(tmp_path, data_dir, llama_dir, corpus_dir):
    """Step 2's mask comes from step 1's stored (log3) state, in the run and in
    its replay alike; its own state is stored in log3 too."""
    from copal.continual import ContinualRun

    config = build_config(small_config(llama_dir, corpus_dir, state={"format": "log3"}, copal=OUTPUT))
    run = ContinualRun(config, tmp_path / "run", data_dir=data_dir)
    run.run()
    for step in (1, 2, 3):
        state = run.dir.step(step)
        assert {state.state_format(name) for name in state.mask_names()} == {"log3"}
    assert run.replay(2).differing == [] and run.replay(3).differing == []
    # a float32 run of the same config differs only through the rounding of C_{t-1}
    plain = ContinualRun(build_config(small_config(llama_dir, corpus_dir, state={"format": "float32"}, copal=OUTPUT)),
                         tmp_path / "plain", data_dir=data_dir)
    plain.run()
    step1 = [torch.equal(run.dir.step(1).mask(n), plain.dir.step(1).mask(n)) for n in run.dir.step(1).mask_names()]
    assert all(step1)  # step 1 uses S_1 itself, whatever the format


def test_a_run_resumes_under_a_config_that_pins_another_format(tmp_path):
    """The format is not part of a run's identity (a lineage keeps its first step's):
    a run recorded under one format resumes under a config that pins another."""
    from copal.config import RunConfig
    from copal.rundir import RunDir, reconcile

    recorded = RunConfig(model="m", domains=["text:a.txt"])
    run_dir = RunDir(tmp_path / "run")
    run_dir.root.mkdir()
    run_dir.write_config(recorded, {})
    pinned = recorded.model_copy(update={"state": recorded.state.model_copy(update={"format": "float32"})})
    assert reconcile(run_dir, pinned)[0].state.format == "float32"
    with pytest.raises(InputError, match="holds a run of another config"):
        reconcile(run_dir, recorded.model_copy(update={"sparsity": 0.6}))
