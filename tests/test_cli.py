"""The command line: run, eval, export, and bad input → exit 2 with one line."""

import json
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from conftest import assert_one_line_error, build_model_dir, small_config, tree_digest
from cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _write_config(path, config):
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, llama_dir, corpus_dir, prefect_api):
    root = tmp_path_factory.mktemp("cli")
    import os

    os.environ["COPAL_DATA_DIR"] = str(root / "arrow")
    config = small_config(llama_dir, corpus_dir, method="sparsegpt", regime="accumulate")
    config_path = _write_config(root / "config.yaml", config)
    result = invoke("run", config_path, "--out", root / "run")
    assert result.exit_code == 0, result.output
    assert "BWT" in result.stdout and "beta" in result.stdout
    yield root, config_path, config
    os.environ.pop("COPAL_DATA_DIR", None)


def test_export_then_eval_reproduces_recorded_ppl(finished_run, corpus_dir):
    root, _, config = finished_run
    metrics = json.loads((root / "run/metrics.json").read_text())
    out = root / "exported"
    assert invoke("export", "--run", root / "run", "--step", 2, "--out", out).exit_code == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out) is not None
    result = invoke("eval", "--model", out, "--data", f"text:{corpus_dir / 'alpha'}.txt", "--seqlen", 64,
                    "--max-tokens", 2048, "--device", "cpu")
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout)
    recorded = metrics["ppl"][1][0]  # after step 2, on alpha
    assert abs(measured["ppl"] - recorded) / recorded < 1e-4
    assert measured["tokens"] == (2048 // 64) * 63


def test_rerunning_a_finished_run_recomputes_nothing(finished_run):
    root, config_path, _ = finished_run
    before = tree_digest(root / "run/steps")
    result = invoke("run", config_path, "--out", root / "run")
    assert result.exit_code == 0
    assert tree_digest(root / "run/steps") == before


BAD_CONFIGS = [
    ({"colour": "red"}, "colour: unknown key"),
    ({"method": "obs"}, "method"),
    ({"regime": "forever"}, "regime"),
    ({"structure": "3:4"}, "structure"),
    ({"structure": "2:4", "sparsity": 0.6}, "but sparsity is 0.6"),
    ({"sparsity": 1.0}, "sparsity"),
    ({"sparsity": 0}, "sparsity"),
    ({"calibration": {"nsamples": 0}}, "calibration.nsamples"),
]


@pytest.mark.parametrize("override,needle", BAD_CONFIGS)
def test_bad_config_is_exit_2(tmp_path, llama_dir, corpus_dir, override, needle):
    config = small_config(llama_dir, corpus_dir, **override)
    result = invoke("run", _write_config(tmp_path / "c.yaml", config), "--out", tmp_path / "run")
    assert_one_line_error(result, needle)
    assert not (tmp_path / "run").exists()


def test_n_m_structures_read_unquoted_from_a_file_and_from_set(tmp_path, llama_dir, corpus_dir):
    """YAML 1.1 reads unquoted 2:4 as the base-60 integer 124; configs and --set read it as 2:4."""
    from copal.config import load_config

    text = yaml.safe_dump(small_config(llama_dir, corpus_dir)).replace("structure: unstructured", "structure: 2:4")
    (tmp_path / "c.yaml").write_text(text)
    assert "structure: 2:4\n" in text and load_config(tmp_path / "c.yaml", []).structure == "2:4"
    assert load_config(tmp_path / "c.yaml", ["structure=4:8"]).structure == "4:8"
    assert load_config(tmp_path / "c.yaml", ["structure=unstructured", "sparsity=0.6"]).sparsity == 0.6


def test_bad_inputs_are_exit_2(tmp_path, llama_dir, corpus_dir, tokenizer_dir, data_dir):
    empty, short, bad_jsonl = tmp_path / "empty.txt", tmp_path / "short.txt", tmp_path / "d.jsonl"
    empty.write_text("\n\n")
    short.write_text("\n\n".join(f"tiny {i}" for i in range(6)))
    bad_jsonl.write_text('{"body": "x"}\n{"body": "y"}\n')
    cases = [
        (["run", tmp_path / "missing.yaml"], ["missing.yaml", "not found"]),
        ([], [str(empty), "empty domain"]),
        ([], [str(short), "calibration part has"]),
        ([], [str(bad_jsonl), "no field 'text'"]),
    ]
    for args, needles in cases:
        if not args:
            config = small_config(llama_dir, corpus_dir, domains=[f"{'jsonl' if 'jsonl' in needles[0] else 'text'}:"
                                                                  f"{needles[0]}"])
            args = ["run", _write_config(tmp_path / "c.yaml", config), "--out", tmp_path / "r"]
        assert_one_line_error(invoke(*args), *needles)

    no_weights = build_model_dir(tmp_path / "noweights", "llama", tokenizer_dir)
    (no_weights / "model.safetensors").unlink()
    corrupt = build_model_dir(tmp_path / "corrupt", "llama", tokenizer_dir)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    for model in (no_weights, corrupt, tmp_path / "nowhere"):
        result = invoke("eval", "--model", model, "--data", f"text:{corpus_dir / 'alpha'}.txt")
        assert_one_line_error(result, str(model))


def test_model_without_decoder_blocks_is_exit_2(tmp_path, tokenizer_dir, corpus_dir, data_dir):
    import shutil

    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "blockless"
    GPT2LMHeadModel(GPT2Config(n_layer=0, n_embd=32, n_head=2, vocab_size=512)).save_pretrained(folder)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, folder / file.name)
    config = small_config(folder, corpus_dir)
    result = invoke("run", _write_config(tmp_path / "c.yaml", config), "--out", tmp_path / "run")
    assert_one_line_error(result, "no decoder blocks")


def test_run_directory_of_another_config_is_left_untouched(finished_run):
    root, _, config = finished_run
    before = tree_digest(root / "run")
    other = _write_config(root / "other.yaml", {**config, "method": "wanda"})
    assert_one_line_error(invoke("run", other, "--out", root / "run"), "another config", "method")
    assert tree_digest(root / "run") == before
    for args, needle in [(["--step", 9, "--out", root / "x"], "no step 9"),
                         (["--step", 1, "--out", root / "run"], "not empty")]:
        assert_one_line_error(invoke("export", "--run", root / "run", *args), needle)
    assert tree_digest(root / "run") == before
    assert_one_line_error(invoke("export", "--run", root / "nope", "--step", 1, "--out", root / "y"),
                           "run directory not found")


def test_real_process_exit_code_and_help():
    result = subprocess.run([sys.executable, "-m", "cli", "run", "/no/such/config.yaml"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == "copal: error: /no/such/config.yaml: config file not found"
    for command in ("run", "eval", "export"):
        assert invoke(command, "--help").exit_code == 0
