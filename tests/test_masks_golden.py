"""Masks stay bit-identical across speed work: every architecture × method ×
structure (and each regime on LLaMA), the optimised pass against the pass as
it was before it was optimised (a full stable sort per row, and every layer
accumulating its own statistic), run side by side on this machine.

Both must equal the hashes recorded with the code before the optimisation
(tests/golden/masks.json) on the machine that recorded them; float kernels
differ between CPUs, so elsewhere the side-by-side comparison is the test.
A change that alters masks on purpose (a new default) records them again:
`COPAL_RECORD_GOLDEN=1 pytest tests/test_masks_golden.py`, and says so in its commit.
"""

import hashlib
import json
import os
from pathlib import Path

import pytest

from conftest import FAMILIES, build_model_dir, small_config

GOLDEN = Path(__file__).parent / "golden" / "masks.json"
STRUCTURES = {"u50": ("unstructured", 0.5, "row"), "layer60": ("unstructured", 0.6, "layer"),
              "2:4": ("2:4", 0.5, "row"), "4:8": ("4:8", 0.5, "row")}
# copal is the default (sensitivity: hessian); copal-output the paper's output sensitivity
METHODS = ("magnitude", "wanda", "sparsegpt", "copal", "copal-output")


def _cases():
    for family in FAMILIES:
        for method in METHODS:
            for structure in STRUCTURES:
                yield family, method, structure, "accumulate"
    for method in METHODS:
        for regime in ("sequential", "reprune", "joint"):
            yield "llama", method, "u50", regime
    yield "llama", "copal", "u50", "accumulate-loss"


def _key(case) -> str:
    return "/".join(case)


def _step_digests(model_dir: Path, corpus_dir: Path, data_dir: Path, tmp: Path, method: str, structure: str,
                  regime: str) -> list[str]:
    """Two steps (domains alpha, beta); the SHA-256 of each step's masks."""
    from copal.config import build_config
    from copal import lifecycle
    from copal.evaluator import Perplexity
    from copal.continual import ContinualRun

    kind, sparsity, scope = STRUCTURES[structure]
    overrides = dict(method=method, structure=kind, sparsity=sparsity, mask_scope=scope, regime=regime)
    if method == "copal-output":
        overrides.update(method="copal", copal={"sensitivity": "output"})
    if regime == "accumulate-loss":
        overrides.update(regime="accumulate", copal={"sensitivity": "loss"})
    config = build_config(small_config(model_dir, corpus_dir, **overrides), "test")
    run = ContinualRun(config, tmp / "run", data_dir=data_dir)
    digests = []
    for index in (0, 1):
        pending = lifecycle.start_step(run.session, index)
        lifecycle.calibrate(run.session, pending)
        lifecycle.prune(run.session, pending)
        lifecycle.finish_step(run.session, pending, {d.name: Perplexity(1.0, 0) for d in run.session.domains})
        digest = hashlib.sha256()
        for name in sorted(pending.writer.packed_masks):
            digest.update(name.encode() + pending.writer.packed_masks[name].numpy().tobytes())
        digests.append(digest.hexdigest())
    return digests


def _stable_sort_drop_lowest(score, count):
    """The selection rule before issue 13: a full stable ascending sort."""
    import torch

    order = torch.argsort(score, dim=-1, stable=True)
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(-1, order[..., :count], False)
    return keep


@pytest.fixture
def unoptimised(monkeypatch):
    """Switch the pass back to how it was: sort-based selection, no shared statistics."""
    from copal import masks, methods, obs

    def apply():
        monkeypatch.setattr(masks, "drop_lowest", _stable_sort_drop_lowest)
        monkeypatch.setattr(obs, "drop_lowest", _stable_sort_drop_lowest)
        for statistic in (methods.InputEnergy, methods.Hessian):
            monkeypatch.setattr(statistic, "input_only", False)

    return apply


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer_dir):
    return {family: build_model_dir(tmp_path_factory.mktemp(family), family, tokenizer_dir) for family in FAMILIES}


@pytest.mark.parametrize("case", list(_cases()), ids=_key)
def test_masks_match_the_unoptimised_pass(case, model_dirs, corpus_dir, data_dir, tmp_path, unoptimised):
    family, method, structure, regime = case
    digests = _step_digests(model_dirs[family], corpus_dir, data_dir, tmp_path / "fast", method, structure, regime)
    unoptimised()
    assert digests == _step_digests(model_dirs[family], corpus_dir, data_dir, tmp_path / "slow", method, structure,
                                    regime)
    recorded = json.loads(GOLDEN.read_text())
    if os.environ.get("COPAL_RECORD_GOLDEN"):  # a default changed masks on purpose: record them again
        if recorded["machine"] != _machine():
            recorded = {"machine": _machine(), "masks": {}}
        recorded["masks"][_key(case)] = digests
        GOLDEN.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    elif recorded["machine"] == _machine():
        assert digests == recorded["masks"][_key(case)]


def _machine() -> str:
    """What float results depend on here: the CPU model and its vector extensions."""
    import platform

    flags = ""
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                flags += line.split(":", 1)[1].strip() + ";"
            if line.startswith("flags"):
                break
    return hashlib.sha256((platform.machine() + flags).encode()).hexdigest()[:16]
