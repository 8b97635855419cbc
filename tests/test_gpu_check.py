"""The CPU dry run of benchmarks/gpu_check.py (SMALL=1): every code path of the prepared
GPU check runs in CI, so that the one short run a GPU machine allows does not fail on
the script itself. On the CPU its "GPU" runs are CPU runs, so they must agree bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_check_dry_run_measures_every_phase(tmp_path, corpus_dir):
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    for name, source in (("docs", "alpha"), ("lexicon", "beta")):
        paragraphs = [p for p in (corpus_dir / f"{source}.txt").read_text().split("\n\n") if p.strip()]
        (jsonl / f"{name}.jsonl").write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs))
    env = dict(os.environ, SMALL="1", JSONL=str(jsonl), BUDGET="900", PHASES="env,ref,scale")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    phases = results["phases"]
    assert phases["env"]["torch"] and phases["env"]["cuda"] is False
    ref = phases["ref"]
    for tag in ("ref-copal-float32-gpu", "ref-copal-float32-cpu"):
        assert isinstance(ref[tag], dict), ref[tag]
        assert ref[tag]["sparsity"] == [0.5, 0.5] and ref[tag]["pass_tokens_per_s"][0] > 0
    assert ref["agreement-copal-float32"]["all_bits"] == 1.0  # both ran on the CPU here
    assert ref["agreement-copal-float32"]["avg_ppl_rel_diff"] == 0.0
    assert ref["replay-gpu-step-on-cpu"]["verified"] is True
    scale = phases["scale"]
    assert scale["floor_two_forwards_s"] > 0
    for method in ("copal", "sparsegpt"):
        assert isinstance(scale[method], dict), scale[method]
        assert len(scale[method]["prune_over_floor"]) == 2
