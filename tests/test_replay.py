"""Replay across machines: the recorded thread count is pinned, so a host with another
core count reproduces a step bit for bit; where a fact that pinning cannot undo differs
(CPU kernels, device, torch), the verdict is agreement and PPL within a stated tolerance."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import small_config
from copal.replay import MAX_PPL_CHANGE, MIN_LAYER_AGREEMENT, ReplayResult
from cli import app

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def recorded_run(tmp_path_factory, llama_dir, corpus_dir):
    """A two-domain sparsegpt/accumulate run recorded with 2 threads; (run dir, data cache)."""
    import torch

    from copal.config import build_config
    from copal.continual import ContinualRun
    from copal.model import torch_threads

    root = tmp_path_factory.mktemp("replay")
    raw = small_config(llama_dir, corpus_dir, domains=[f"text:{corpus_dir / n}.txt" for n in ("alpha", "beta")],
                       method="sparsegpt", calibration={"nsamples": 4}, evaluation={"max_tokens": 512})
    with pytest.MonkeyPatch.context() as patch, torch_threads(2):
        patch.setenv("COPAL_DATA_DIR", str(root / "arrow"))
        ContinualRun(build_config(raw), root / "run").run()
    assert json.loads((root / "run/steps/2/step.json").read_text())["environment"]["threads"] == 2
    assert torch.get_num_threads() == 2
    return root / "run", root / "arrow"


def _replay_elsewhere(run: Path, data: Path, **env) -> subprocess.CompletedProcess:
    """`copal replay` in a fresh process whose environment differs as given."""
    environ = os.environ | {"COPAL_DATA_DIR": str(data), "PYTHONPATH": str(ROOT)} | env
    return subprocess.run([sys.executable, "-m", "cli", "replay", "--run", str(run), "--step", "2"],
                          env=environ, capture_output=True, text=True, timeout=600)


def test_a_host_with_one_thread_reproduces_a_step_recorded_with_two(recorded_run):
    run, data = recorded_run
    done = _replay_elsewhere(run, data, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    assert done.returncode == 0, done.stderr
    assert "bit for bit with the recorded 2 thread(s)" in done.stdout
    assert "differ" not in done.stdout + done.stderr


def test_other_cpu_kernels_are_named_and_judged_within_the_tolerance(recorded_run):
    run, data = recorded_run
    done = _replay_elsewhere(run, data, ATEN_CPU_CAPABILITY="default")
    assert done.returncode == 0, done.stderr
    assert "differ" not in done.stdout + done.stderr
    # Bit-identical on this tiny model, or within tolerance naming the fact that differs.
    assert "bit for bit" in done.stdout or "cpu_capability" in done.stdout


def _result(agreement: dict, facts: dict, ppl=None) -> ReplayResult:
    return ReplayResult(2, 4, facts, agreement, ppl, "beta")


def test_the_verdict_and_what_it_says():
    same = _result({"a": 1.0, "b": 1.0}, {})
    assert same.verified and "bit for bit with the recorded 4 thread(s)" in same.lines()[0]
    # The recorded environment (threads pinned) but other masks: not reproduced.
    drift = _result({"a": 1.0, "b": 0.999}, {}, (10.0, 10.001))
    assert not drift.verified and "masks differ from the record in 1 layer(s)" in drift.lines()[0]
    # Another CPU kernel: within tolerance → verified; the facts, agreement and PPL are said.
    kernels = {"cpu_capability": ("AVX512", "AVX2")}
    near = _result({"a": 1.0, "b": MIN_LAYER_AGREEMENT + 0.005}, kernels, (10.0, 10.0 * (1 + MAX_PPL_CHANGE / 2)))
    text = "\n".join(near.lines())
    assert near.verified and "cpu_capability AVX512 → AVX2" in text and "differ" not in text
    assert "b: 99.5000%" in text and "0.500% change" in text and "tolerance" in text
    for far in (_result({"a": MIN_LAYER_AGREEMENT - 0.001}, kernels, (10.0, 10.0)),
                _result({"a": 0.999}, kernels, (10.0, 10.0 * (1 + 2 * MAX_PPL_CHANGE)))):
        assert not far.verified and "outside tolerance" in far.lines()[0]


def test_the_command_exits_1_outside_the_tolerance(recorded_run, monkeypatch):
    from copal.continual import ContinualRun

    run, data = recorded_run
    monkeypatch.setenv("COPAL_DATA_DIR", str(data))
    far = _result({"model.layers.0.mlp.up_proj": 0.9}, {"device": ("cuda NVIDIA H200", "cpu")}, (10.0, 13.0))
    monkeypatch.setattr(ContinualRun, "replay", lambda self, step: far)
    result = CliRunner().invoke(app, ["replay", "--run", str(run), "--step", "2"])
    assert result.exit_code == 1
    assert result.stderr.startswith("copal: step 2: outside tolerance")
    assert "device cuda NVIDIA H200 → cpu" in result.stderr
    near = _result({"model.layers.0.mlp.up_proj": 0.999}, {"device": ("cuda NVIDIA H200", "cpu")}, (10.0, 10.01))
    monkeypatch.setattr(ContinualRun, "replay", lambda self, step: near)
    result = CliRunner().invoke(app, ["replay", "--run", str(run), "--step", "2"])
    assert result.exit_code == 0 and "reproduced within tolerance" in result.stdout
