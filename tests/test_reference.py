"""The shipped reference model: loads, evaluates, and is the model the README describes."""

import json
import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from copal.config import BENCH_CONFIG, load_config
from copal.data import ingest
from copal.windows import evaluation_windows
from copal.metrics import perplexity
from copal.model import all_prunable, load_model
from cli import app

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "data/models/reference"
DOMAINS = ["docs", "lexicon", "code", "fortunes", "manuals"]


@pytest.fixture(scope="module")
def quality():
    return json.loads((REFERENCE / "quality.json").read_text())


def test_reference_model_is_small_and_loadable():
    assert sum(f.stat().st_size for f in REFERENCE.iterdir()) <= 30 * 2**20
    model, tokenizer = load_model(str(REFERENCE))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert 8000 <= len(tokenizer) <= 8300
    for name, module in all_prunable(model).items():  # every N:M group is whole
        assert module.weight.shape[1] % 8 == 0, name


def test_reference_model_beats_unigram_clearly_everywhere(quality):
    assert sorted(quality) == sorted(DOMAINS)
    for name in DOMAINS:
        assert quality[name]["ppl"] < 0.5 * quality[name]["unigram_ppl"], name


def test_recomputed_ppl_matches_quality_file_and_readme(quality):
    model, tokenizer = load_model(str(REFERENCE))
    windows = evaluation_windows(ingest("builtin:manuals"), tokenizer, 256, 65536)
    ppl, tokens = perplexity(model, windows, torch.device("cpu"))
    assert tokens == quality["manuals"]["tokens"]
    assert abs(ppl - quality["manuals"]["ppl"]) / quality["manuals"]["ppl"] < 0.01
    row = re.search(r"^\| manuals \| ([\d.]+) \| ([\d.]+) \|", (ROOT / "README.md").read_text(), re.M)
    assert row, "README has no quality row for manuals"
    assert abs(float(row.group(1)) - ppl) / ppl < 0.01


def test_demo_config_uses_the_reference_model_and_the_five_domains():
    config = load_config(None)
    assert Path(config.model) == REFERENCE
    assert config.domains == [f"builtin:{name}" for name in DOMAINS]
    assert (config.method, config.regime, config.structure, config.sparsity) == ("copal", "accumulate",
                                                                                 "unstructured", 0.5)


def test_bench_config_is_the_demo_sequence_with_lighter_evaluation():
    demo, bench_config = load_config(None), load_config(None, default=BENCH_CONFIG)
    for key in ("model", "domains", "calibration", "dtype"):
        assert getattr(bench_config, key) == getattr(demo, key), key
    assert bench_config.evaluation.seqlen == demo.evaluation.seqlen
    assert bench_config.evaluation.max_tokens < demo.evaluation.max_tokens
    assert bench_config.evaluation.domains == "seen"


def test_quick_benchmark_on_the_reference_model(tmp_path, data_dir):
    """`copal bench --quick` as CI runs it: the shipped model and real domains."""
    result = CliRunner().invoke(app, ["bench", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "benchmark.json").read_text())
    assert Path(summary["setup"]["model"]) == REFERENCE
    assert summary["dense"]["domains"] == DOMAINS[:3] and summary["missing"] == []
    assert [cell["id"] for cell in summary["cells"]] == summary["cost_cells"] == [
        "wanda-reprune-u50", "sparsegpt-reprune-u50", "copal-accumulate-u50"]
    for cell in summary["cells"]:
        assert cell["dense_ppl"] == summary["dense"]["ppl"]
        assert [len([v for v in row if v is not None]) for row in cell["ppl"]] == [1, 2, 3]
        assert all(0 < cell["ppl"][-1][i] < 3 * summary["dense"]["ppl"][i] for i in range(3))
    text = (tmp_path / "benchmark.md").read_text()
    assert "copal's (output sensitivity) pruning time is" in text and "× wanda's" in text and "× sparsegpt's" in text
    for image in ("avg_ppl.png", "bwt.png", "ppl_matrix-copal-accumulate-u50.png"):
        assert (tmp_path / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
