"""Masks stay bit-identical across speed work: every architecture × method ×
structure (and each regime on LLaMA) against hashes recorded before the
layer-wise pass was optimised (tests/golden/masks.json).

Regenerate only for an intended change of the masks, and say so in the commit:
    COPAL_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_masks_golden.py
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
METHODS = ("magnitude", "wanda", "sparsegpt", "copal")


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
    from copal.continual import ContinualRun

    kind, sparsity, scope = STRUCTURES[structure]
    overrides = dict(method=method, structure=kind, sparsity=sparsity, mask_scope=scope, regime=regime)
    if regime == "accumulate-loss":
        overrides.update(regime="accumulate", copal={"sensitivity": "loss"})
    config = build_config(small_config(model_dir, corpus_dir, **overrides), "test")
    run = ContinualRun(config, tmp / "run", data_dir=data_dir)
    digests = []
    for index in (0, 1):
        pending = run.start_step(index)
        run.calibrate(pending)
        run.prune(pending)
        run.finish_step(pending, {domain.name: {"ppl": 1.0, "tokens": 0} for domain in run.domains})
        digest = hashlib.sha256()
        for name in sorted(pending.writer.packed_masks):
            digest.update(name.encode() + pending.writer.packed_masks[name].numpy().tobytes())
        digests.append(digest.hexdigest())
    return digests


@pytest.fixture(scope="module")
def golden():
    if os.environ.get("COPAL_REGENERATE_GOLDEN"):
        recorded = {}
        yield recorded
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    else:
        yield json.loads(GOLDEN.read_text())


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer_dir):
    return {family: build_model_dir(tmp_path_factory.mktemp(family), family, tokenizer_dir) for family in FAMILIES}


@pytest.mark.parametrize("case", list(_cases()), ids=_key)
def test_masks_match_recorded(case, golden, model_dirs, corpus_dir, data_dir, tmp_path):
    family, method, structure, regime = case
    digests = _step_digests(model_dirs[family], corpus_dir, data_dir, tmp_path, method, structure, regime)
    if os.environ.get("COPAL_REGENERATE_GOLDEN"):
        golden[_key(case)] = digests
    else:
        assert digests == golden[_key(case)]
