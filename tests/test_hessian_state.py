"""Second-order continual state (issue 20 item 1): an accumulated Hessian stored
once per distinct layer input, as its symmetric half (`state.hessian: sym16`), and
reconstructed weights recomputed from W0, the mask and that state instead of stored
— bit for bit the weights the step evaluated."""

import json
import zlib

import pytest
import torch
from safetensors import safe_open

from conftest import small_config
from copal.codecs import HESSIAN_CODECS, SymmetricHalf16, SymmetricHalf16Zip, codec_for
from copal.config import build_config
from copal.continual import ContinualRun
from copal.errors import InputError
from copal.methods import SparseGPT
from copal.model import all_prunable
from copal.records import StepRecord
from copal.regimes import REGIMES
from copal.state import StepState, StepWriter


def _hessian(size=40, tokens=200, seed=0) -> torch.Tensor:
    x = torch.randn(tokens, size, generator=torch.Generator().manual_seed(seed)) * torch.logspace(-3, 1, size)
    return x.t() @ x


def test_sym16_keeps_the_upper_half_in_float16_and_decodes_symmetric():
    codec, value = SymmetricHalf16(), _hessian()
    encoded = codec.encode("h", value)
    assert set(encoded) == set(codec.keys("h"))
    assert encoded["h.upper"].dtype == torch.float16 and encoded["h.upper"].numel() == 40 * 41 // 2
    decoded = codec.decode("h", encoded.__getitem__)
    assert torch.equal(decoded, decoded.t()) and torch.equal(decoded, codec.roundtrip("l", value)[1])
    normal = value.abs() >= value.abs().max() * 2 ** -24  # float16's normal range after the scale
    error = ((decoded - value).abs() / value.abs().clamp(min=1e-30))[normal]
    assert error.max() <= 2 ** -11
    assert torch.equal(codec.decode("h", codec.encode("h", value.clone()).__getitem__), decoded)
    assert codec_for("sym16/v1") is HESSIAN_CODECS["sym16"]
    with pytest.raises(ValueError, match="square"):
        codec.encode("h", torch.ones(3, 4))
    with pytest.raises(ValueError, match="finite"):
        codec.encode("h", torch.full((3, 3), float("nan")))


def test_sym16z_stores_sym16_deflated_and_decodes_to_exactly_sym16s_matrix():
    plain, zipped, value = SymmetricHalf16(), SymmetricHalf16Zip(), _hessian(size=64)
    encoded, decoded = zipped.roundtrip("h", value)
    stored = zipped.store(encoded)
    assert set(stored) == set(zipped.keys("h")) and stored["h.zipped"].dtype == torch.uint8
    x = torch.randn(400, 64, generator=torch.Generator().manual_seed(0))  # entries of one scale, as in a real H
    assert zipped.store(zipped.roundtrip("h", x.t() @ x)[0])["h.zipped"].numel() < 0.95 * 64 * 65
    assert torch.equal(zipped.decode("h", stored.__getitem__), decoded)
    assert torch.equal(decoded, plain.decode("h", plain.encode("h", value).__getitem__))
    assert codec_for("sym16z/v1") is HESSIAN_CODECS["sym16z"]
    for corrupt in (stored["h.zipped"][:-7], torch.frombuffer(bytearray(zlib.compress(b"abc")), dtype=torch.uint8)):
        with pytest.raises(InputError, match="corrupt sym16z state"):
            zipped.decode("h", (stored | {"h.zipped": corrupt}).__getitem__)


def test_a_sym16z_run_prunes_exactly_as_a_sym16_run(tmp_path, llama_dir, corpus_dir, data_dir):
    """The formats differ in bytes on disk only: same masks, same weights, smaller files."""
    domains = small_config(llama_dir, corpus_dir)["domains"][:2]
    for hessian in ("sym16", "sym16z"):
        config = build_config(small_config(llama_dir, corpus_dir, domains=domains, state={"hessian": hessian}))
        ContinualRun(config, tmp_path / hessian).run()
    plain, zipped = StepState(tmp_path / "sym16/steps/2"), StepState(tmp_path / "sym16z/steps/2")
    run = ContinualRun(config, tmp_path / "sym16z")
    dense = run.session.execution.dense
    for name in all_prunable(run.session.execution.model):
        assert torch.equal(plain.mask(name), zipped.mask(name))
        assert torch.equal(plain.weight(name, dense), zipped.weight(name, dense))
        assert torch.equal(plain.sensitivity(name), zipped.sensitivity(name))
    size = {hessian: sum(f.stat().st_size for f in (tmp_path / hessian / "steps/2/sensitivity").glob("*.safetensors"))
            for hessian in ("sym16", "sym16z")}
    assert size["sym16z"] < size["sym16"]


def test_a_float32_lineage_keeps_float32_hessians(tmp_path):
    """state.hessian applies to a lineage's first step; later steps keep the parent's format."""
    accumulate, method = REGIMES["accumulate"], SparseGPT()
    first = StepWriter(tmp_path / "a", 1, hessian_format="float32")
    accumulate.statistic("l", _hessian(seed=1), method, None, first)
    first.finish_block(0)
    parent = StepState(first.commit(StepRecord(step=1, parent=0)))
    second = StepWriter(tmp_path / "b", 2, hessian_format="sym16")
    combined = accumulate.statistic("l", _hessian(seed=2), method, parent, second)
    assert torch.equal(combined, method.combine(parent.sensitivity("l"), _hessian(seed=2)))
    second.finish_block(0)
    assert StepState(second.commit(StepRecord(step=2, parent=1))).state_format("l") == "float32"


def _groups(names):
    by_block = {}
    for name in names:
        by_block.setdefault(name.rsplit(".", 2)[0], []).append(name.rsplit(".", 1)[1])
    return by_block


@pytest.mark.parametrize("settings", [
    {"method": "sparsegpt", "state": {"hessian": "sym16"}},
    {"method": "sparsegpt", "sparsegpt": {"refit": "pcg"}, "state": {"hessian": "sym16"}, "structure": "2:4"},
    {"method": "copal", "copal": {"sensitivity": "output", "reconstruct": True, "refit": "pcg"}},
    {"method": "copal"},  # the default: sensitivity hessian, mask admm, refit pcg, state.hessian sym16z
    # the default's refit runs ADMM again under the step's structure: per layer what it
    # ran stacked, under a profile's counts, at layer scope
    {"method": "copal", "sparsity_profile": "owl", "structure": "unstructured"},
    {"method": "copal", "mask_scope": "layer", "sparsity": 0.6},
    {"method": "wanda", "wanda": {"refit": "pcg"}},
    {"method": "copal", "copal": {"mask": "obs"}, "structure": "2:4"},
    {"method": "magnitude", "magnitude": {"refit": "obs"}, "structure": "2:4"},
])
def test_accumulate_stores_no_weights_and_recomputes_the_evaluated_ones(tmp_path, llama_dir, corpus_dir, data_dir,
                                                                        settings, monkeypatch):
    evaluated = {}  # (step, layer) → the weight the step evaluated, as its writer held it before the commit
    commit = StepWriter.commit

    def keep_evaluated(writer, record):
        writer.worker.wait()
        for file in writer.weights.folder.glob("*.safetensors"):
            with safe_open(str(file), "pt") as handle:
                evaluated.update({(record.step, key): handle.get_tensor(key) for key in handle.keys()})
        return commit(writer, record)

    monkeypatch.setattr(StepWriter, "commit", keep_evaluated)
    config = build_config(small_config(llama_dir, corpus_dir, **settings))
    run = ContinualRun(config, tmp_path / "run")
    run.run()
    dense = run.session.execution.dense
    names = list(all_prunable(run.session.execution.model))
    for step in (1, 3):
        state = StepState(tmp_path / f"run/steps/{step}")
        assert not (state.folder / "weights").exists()
        assert state.record.reweight["method"] == config.method
        for name in names:
            assert torch.equal(state.weight(name, dense), evaluated[step, name]), (step, name)
    head = StepState(tmp_path / "run/steps/3")
    if config.method == "copal" and config.copal.sensitivity != "hessian":
        return
    aliases = json.loads((head.folder / "sensitivity/aliases.json").read_text())
    owners = {alias.rsplit(".", 1)[1]: owner.rsplit(".", 1)[1] for alias, owner in aliases.items()}
    assert {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.items() <= owners.items()
    stored = set()
    for file in (head.folder / "sensitivity").glob("block-*.safetensors"):  # not OWL's energy file
        with safe_open(str(file), "pt") as handle:
            assert handle.metadata()["copal_state_format"] == f"{config.state.hessian}/v1"
            stored |= {key.rsplit(".", 1)[0] for key in handle.keys()}
    assert not stored & set(aliases)  # each distinct input's Hessian once
    for alias, owner in aliases.items():
        assert torch.equal(head.sensitivity(alias), head.sensitivity(owner))


def test_a_corrupt_reweight_record_is_an_input_error(tmp_path, llama_dir, corpus_dir, data_dir):
    config = build_config(small_config(llama_dir, corpus_dir, method="sparsegpt", domains=small_config(
        llama_dir, corpus_dir)["domains"][:1]))
    run = ContinualRun(config, tmp_path / "run")
    run.run()
    record = json.loads((tmp_path / "run/steps/1/step.json").read_text())
    record["reweight"] = {"method": "sparsegpt", "options": {"blocksize": 128, "bogus": 1}}
    (tmp_path / "run/steps/1/step.json").write_text(json.dumps(record))
    name = next(iter(all_prunable(run.session.execution.model)))
    with pytest.raises(InputError, match="reweight"):
        StepState(tmp_path / "run/steps/1").weight(name, run.session.execution.dense)


def test_sparsegpts_mask_is_sparsegpts_pass_and_refit_on_the_accumulated_hessian(tmp_path, llama_dir, corpus_dir,
                                                                                 data_dir):
    """`method: copal` with `mask: obs` chooses and rebuilds exactly as SparseGPT with a
    8-iteration pcg refit in the accumulate regime: same masks, same weights, bit for bit."""
    domains = small_config(llama_dir, corpus_dir)["domains"][:2]
    runs = {}
    for label, settings in (("copal", {"copal": {"mask": "obs"}}), ("sparsegpt", {"method": "sparsegpt", "sparsegpt": {
            "refit": "pcg", "refit_iterations": 8}})):
        config = build_config(small_config(llama_dir, corpus_dir, domains=domains, **settings))
        runs[label] = ContinualRun(config, tmp_path / label)
        runs[label].run()
    assert build_config(small_config(llama_dir, corpus_dir)).copal.rebuilt_by == "pcg"
    dense = runs["copal"].session.execution.dense
    copal, sparsegpt = StepState(tmp_path / "copal/steps/2"), StepState(tmp_path / "sparsegpt/steps/2")
    for name in all_prunable(runs["copal"].session.execution.model):
        assert torch.equal(copal.mask(name), sparsegpt.mask(name)), name
        assert torch.equal(copal.weight(name, dense), sparsegpt.weight(name, dense)), name


def test_a_run_begun_with_float32_hessians_resumes_in_float32(tmp_path, llama_dir, corpus_dir, data_dir):
    """Runs recorded before sym16 became the default resume under the new default
    config and keep their lineage's float32 Hessians."""
    domains = small_config(llama_dir, corpus_dir)["domains"][:2]
    old = build_config(small_config(llama_dir, corpus_dir, domains=domains[:1], state={"hessian": "float32"}))
    ContinualRun(old, tmp_path / "run").run()
    ContinualRun(build_config(small_config(llama_dir, corpus_dir, domains=domains)), tmp_path / "run").run()
    for step in (1, 2):
        state = StepState(tmp_path / f"run/steps/{step}")
        assert {state.state_format(name) for name in state.mask_names()} == {"float32"}
