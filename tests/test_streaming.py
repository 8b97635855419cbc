"""Streaming (copal.streaming) against the resident model: the same masks,
statistics and PPLs on tiny models of every architecture, sharded and in bf16;
a truncated shard is one clear error and loses nothing already recorded."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import FAMILIES, build_model_dir, small_config, tree_digest
from copal.errors import InputError


def _shard(folder: Path, dtype: torch.dtype | None = None, max_shard_size: str | None = None) -> Path:
    """Re-save a model directory in place: another dtype and/or several shards."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32)
    for file in folder.glob("*.safetensors"):
        file.unlink()
    model.save_pretrained(folder, safe_serialization=True, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return folder


def _two_steps(model_dir, corpus_dir, data_dir, root, streaming, **overrides):
    """Two steps (alpha, beta) with evaluation; per step the masks' digest, the
    accumulated statistic's digest and the PPLs; the dense PPLs."""
    from copal.config import build_config
    from copal.continual import ContinualRun

    config = build_config(small_config(model_dir, corpus_dir, **overrides), "test")
    run = ContinualRun(config, root, data_dir=data_dir, streaming=streaming)
    assert run.session.execution.streamed == bool(streaming)
    dense = run.evaluator.dense_ppl()
    steps = []
    for index in (0, 1):
        record = run.step(index)
        folder = root / "steps" / str(record.step)
        digest = hashlib.sha256()
        for name in sorted(run.dir.step(record.step).mask_names()):
            digest.update(name.encode() + run.dir.step(record.step).mask(name).numpy().tobytes())
        steps.append({"masks": digest.hexdigest(), "ppl": record.ppl, "sparsity": record.layer_sparsity,
                      "files": tree_digest(folder / "sensitivity") if (folder / "sensitivity").exists() else None})
    return dense, steps


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_equals_resident_float32(tmp_path, tokenizer_dir, corpus_dir, data_dir, family):
    """float32, sharded: masks, statistics and PPLs bit-identical."""
    model_dir = _shard(build_model_dir(tmp_path / "m", family, tokenizer_dir), max_shard_size="100KB")
    assert len(list(model_dir.glob("*.safetensors"))) > 2
    resident = _two_steps(model_dir, corpus_dir, data_dir, tmp_path / "resident", False)
    streamed = _two_steps(model_dir, corpus_dir, data_dir, tmp_path / "streamed", True)
    assert streamed == resident


@pytest.mark.parametrize("method,regime", [("sparsegpt", "sequential"), ("wanda", "joint"), ("magnitude", "reprune")])
def test_streaming_equals_resident_other_methods(tmp_path, llama_dir, corpus_dir, data_dir, method, regime):
    """Reconstructed weights (sparsegpt), weight stasis (sequential), pooled data (joint)."""
    resident = _two_steps(llama_dir, corpus_dir, data_dir, tmp_path / "resident", False, method=method, regime=regime)
    streamed = _two_steps(llama_dir, corpus_dir, data_dir, tmp_path / "streamed", True, method=method, regime=regime)
    assert streamed == resident


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_streaming_bf16_checkpoint(tmp_path, tokenizer_dir, corpus_dir, data_dir, family, dtype):
    """A bf16 checkpoint in shards, computed in float32 or kept in bf16: the same
    masks and PPLs as the resident model loaded in that dtype."""
    model_dir = _shard(build_model_dir(tmp_path / "m", family, tokenizer_dir), torch.bfloat16, "100KB")
    resident = _two_steps(model_dir, corpus_dir, data_dir, tmp_path / "resident", False, dtype=dtype)
    streamed = _two_steps(model_dir, corpus_dir, data_dir, tmp_path / "streamed", True, dtype=dtype)
    assert streamed == resident


def test_tied_embeddings_stream(tmp_path, tokenizer_dir, corpus_dir, data_dir):
    """A model whose head is its embedding matrix (tied): the tie survives, the blocks stream."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    folder = tmp_path / "m"
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, folder / file.name)
    resident = _two_steps(folder, corpus_dir, data_dir, tmp_path / "resident", False)
    streamed = _two_steps(folder, corpus_dir, data_dir, tmp_path / "streamed", True)
    assert streamed == resident


def test_only_non_block_tensors_are_resident(tmp_path, llama_dir, corpus_dir, data_dir):
    from copal.config import build_config
    from copal.continual import ContinualRun
    from copal.model import find_blocks

    run = ContinualRun(build_config(small_config(llama_dir, corpus_dir), "test"), tmp_path / "run", data_dir=data_dir)
    assert run.session.execution.streamed  # on by default
    _, blocks = find_blocks(run.session.model)
    assert all(p.is_meta for p in blocks.parameters())
    assert not any(p.is_meta for name, p in run.session.model.named_parameters() if ".layers." not in name)
    run.step(0)
    assert all(p.is_meta for p in blocks.parameters())  # released after the pass and the evaluation


def test_chunked_evaluation_equals_one_chunk(tmp_path, llama_dir, corpus_dir, data_dir, monkeypatch):
    """Windows cut into chunks (a tiny hidden-state budget): the same PPL."""
    from copal import streaming
    from copal.config import build_config
    from copal.continual import ContinualRun

    run = ContinualRun(build_config(small_config(llama_dir, corpus_dir), "test"), tmp_path / "run", data_dir=data_dir)
    whole = run.evaluator.evaluate()
    monkeypatch.setattr(streaming, "HIDDEN_BUDGET_BYTES", 1)
    assert run.evaluator.evaluate() == whole


def test_whole_model_statistic_keeps_the_model_resident(tmp_path, llama_dir, corpus_dir, data_dir):
    from copal.config import build_config
    from copal.continual import ContinualRun

    config = build_config(small_config(llama_dir, corpus_dir, copal={"sensitivity": "loss"}), "test")
    assert not ContinualRun(config, tmp_path / "run", data_dir=data_dir).session.execution.streamed


def _recorded_digest(root: Path) -> str:
    """One hash over every recorded file of a run (a failed step's partial directory is not recorded)."""
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and ".partial" not in str(p.relative_to(root))):
        digest.update(str(file.relative_to(root)).encode() + file.read_bytes())
    return digest.hexdigest()


def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size - 100])


def test_truncated_shard_is_an_input_error_and_loses_nothing(tmp_path, tokenizer_dir, corpus_dir, data_dir):
    from copal.config import build_config
    from copal.continual import ContinualRun

    model_dir = _shard(build_model_dir(tmp_path / "m", "llama", tokenizer_dir), max_shard_size="100KB")
    config = build_config(small_config(model_dir, corpus_dir), "test")
    root = tmp_path / "run"
    run = ContinualRun(config, root, data_dir=data_dir)
    run.step(0)
    before = _recorded_digest(root)
    shards = sorted(model_dir.glob("*.safetensors"))
    _truncate(shards[len(shards) // 2])
    with pytest.raises(InputError, match="corrupt weights file"):
        ContinualRun(config, root, data_dir=data_dir)
    with pytest.raises(InputError, match="corrupt weights file"):  # a shard truncated under a running process
        run.step(1)
    assert _recorded_digest(root) == before
    assert not list((root / "steps").glob("2"))


def test_truncated_shard_exits_2(tmp_path, tokenizer_dir, corpus_dir, data_dir):
    """`copal step` on a run whose model lost the end of a shard: exit 2, one line, the run unchanged."""
    import yaml
    from typer.testing import CliRunner

    from conftest import assert_one_line_error
    from copal.config import build_config
    from copal.continual import ContinualRun
    from cli import app

    model_dir = _shard(build_model_dir(tmp_path / "m", "llama", tokenizer_dir), max_shard_size="100KB")
    root = tmp_path / "run"
    ContinualRun(build_config(small_config(model_dir, corpus_dir), "test"), root, data_dir=data_dir).step(0)
    before = tree_digest(root)
    shard = sorted(model_dir.glob("*.safetensors"))[-1]
    _truncate(shard)
    result = CliRunner().invoke(app, ["step", f"text:{corpus_dir / 'beta.txt'}", "--run", str(root)])
    assert_one_line_error(result, str(shard), "corrupt weights file")
    assert tree_digest(root) == before
