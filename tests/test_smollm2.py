"""The real LLM that `make setup` converts (issue 9's done-when): the pinned GGUF became
data/models/smollm2-135m, and `copal run configs/smollm2.yaml` works on it.

Not skipped when the folder is missing: setup installs it, so its absence is a failure
(setup says why it skipped the download). The run is shrunk with --set (two of the test
session's small text domains, a few calibration windows) to stay at about a minute."""

import json
import re

import yaml
from typer.testing import CliRunner

from copal.paths import PROJECT_ROOT
from cli import app

MODEL_DIR = PROJECT_ROOT / "data" / "models" / "smollm2-135m"


def _pinned_sha256() -> str:
    (sha,) = re.findall(r"^SMOLLM_SHA256=([0-9a-f]{64})$", (PROJECT_ROOT / "scripts/setup.sh").read_text(), re.M)
    return sha


def test_setup_converted_the_pinned_gguf():
    assert (MODEL_DIR / "config.json").is_file(), f"{MODEL_DIR} is missing: run `make setup` (it says why it skipped)"
    source = json.loads((MODEL_DIR / "gguf_source.json").read_text())
    assert source["sha256"] == _pinned_sha256()
    config = json.loads((MODEL_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert "quantization_config" not in config  # a plain float model, loadable and savable


def test_copal_run_on_the_smollm2_config(tmp_path, corpus_dir, prefect_api, monkeypatch):
    monkeypatch.chdir(PROJECT_ROOT)  # the config names the model relative to the project
    monkeypatch.setenv("COPAL_DATA_DIR", str(tmp_path / "arrow"))
    domains = [f"text:{corpus_dir / name}.txt" for name in ("alpha", "beta")]
    result = CliRunner().invoke(app, [
        "run", "configs/smollm2.yaml", "--out", str(tmp_path / "run"),
        "--set", f"domains={yaml.safe_dump(domains, default_flow_style=True).strip()}",
        "--set", "calibration.nsamples=4", "--set", "calibration.seqlen=64",
        "--set", "evaluation.seqlen=128", "--set", "evaluation.max_tokens=512",
        "--set", "state.format=log6L"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run/metrics.json").read_text())
    assert len(metrics["steps"]) == 2
    dense, after = metrics["dense_ppl"], metrics["ppl"][-1]  # after step 2, both domains
    # SmolLM2 reads Python's own source fluently; pruning half its weights hurts, but
    # leaves a working model, not noise (vocabulary 49,152)
    assert len(dense) == len(after) == 2 and all(1 < ppl < 50 for ppl in dense)
    assert all(d < p < 50 * d for d, p in zip(dense, after))
    step = json.loads((tmp_path / "run/steps/2/step.json").read_text())
    assert abs(step["sparsity"] - 0.5) < 1e-3
