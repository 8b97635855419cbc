"""Fixtures: tiny random models of several architectures, a tokenizer trained
here, and small real-text domains — all built offline inside the test session."""

import hashlib
import inspect
import json
import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

from flows.api import prefect_settings  # noqa: E402

# The test session is an entry point, as the command line's main is: the project's
# Prefect settings before any test module imports Prefect (tests call flows and the
# CLI's app directly, not main).
prefect_settings()


def _real_text(modules) -> str:
    """Real prose and code nobody on this project wrote: stdlib sources."""
    return "\n\n".join(inspect.getsource(module) for module in modules)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    """Three small text domains: one .txt file each."""
    import argparse, asyncio.tasks, collections, difflib, email.message, json.decoder, logging, textwrap, unittest.case

    root = tmp_path_factory.mktemp("corpus")
    domains = {
        "alpha": [collections, textwrap],
        "beta": [json.decoder, email.message, difflib],
        "gamma": [logging, argparse],
        "delta": [asyncio.tasks, unittest.case],
    }
    for name, modules in domains.items():
        (root / f"{name}.txt").write_text(_real_text(modules))
    return root


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_dir) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(p) for p in sorted(corpus_dir.glob("*.txt"))], trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bos_tokenizer_dir(tmp_path_factory, corpus_dir) -> Path:
    """A tokenizer that puts a BOS before every text by default, as Llama-2's, Gemma's
    and Mistral's do (a template post-processor, saved as a plain fast tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(p) for p in sorted(corpus_dir.glob("*.txt"))], trainer)
    bos = tokenizer.token_to_id("<bos>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                             special_tokens=[("<bos>", bos)])
    folder = tmp_path_factory.mktemp("bos_tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", eos_token="<eos>").save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def bos_llama_dir(tmp_path_factory, bos_tokenizer_dir) -> Path:
    """A tiny random Llama whose tokenizer adds a BOS."""
    return build_model_dir(tmp_path_factory.mktemp("bos_llama"), "llama", bos_tokenizer_dir)


VOCAB = 512


def tiny_config(family: str):
    """A 2-block random model config of `family`; all inputs divisible by 8."""
    import transformers as tf

    common = dict(vocab_size=VOCAB, tie_word_embeddings=False)
    if family == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=256, sliding_window=None, **common)
    if family == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=256, **common)
    if family == "phi3":
        return tf.Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0, **common)
    if family == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=256, word_embed_proj_dim=64, **common)
    if family == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, **common)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=256, **common)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "phi3", "opt", "gpt2", "gpt_neox"]


def build_model_dir(folder: Path, family: str, tokenizer_dir: Path, seed: int = 0) -> Path:
    import shutil

    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family))
    model.save_pretrained(folder, safe_serialization=True)
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, folder / file.name)
    return folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return build_model_dir(tmp_path_factory.mktemp("llama"), "llama", tokenizer_dir)


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """A private Arrow cache for the test."""
    folder = tmp_path / "arrow"
    monkeypatch.setenv("COPAL_DATA_DIR", str(folder))
    return folder


def small_config(model_dir: Path, corpus_dir: Path, **overrides) -> dict:
    config = {
        "name": "test",
        "model": str(model_dir),
        "domains": [f"text:{corpus_dir / name}.txt" for name in ("alpha", "beta", "gamma")],
        "method": "copal",
        "regime": "accumulate",
        "structure": "unstructured",
        "sparsity": 0.5,
        "calibration": {"nsamples": 8, "seqlen": 64, "seed": 0, "batch_size": 4},
        "evaluation": {"seqlen": 64, "max_tokens": 2048, "batch_size": 8},
        "device": "cpu",
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def read_json(path: Path):
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="session", autouse=True)
def isolated_services(tmp_path_factory):
    """Every test's MLflow store and Prefect home live in a temp folder, never the project's."""
    root = tmp_path_factory.mktemp("services")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["PREFECT_HOME"] = str(root / "prefect")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    yield root


@pytest.fixture(scope="session")
def prefect_api(isolated_services):
    """One temporary Prefect API for the in-process flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def without_timings(metrics) -> dict:
    """metrics.json (a dict or a RunMetrics) minus the fields that differ between identical runs."""
    metrics = json.loads(json.dumps(metrics if isinstance(metrics, dict) else metrics.as_json()))
    for step in metrics["steps"]:
        for key in ("seconds", "prune_seconds", "peak_rss_mb"):
            step.pop(key)
    return metrics


def tree_digest(root: Path) -> str:
    """One hash over every file (path and bytes) under `root`."""
    import hashlib

    digest = hashlib.sha256()
    for file in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode() + file.read_bytes())
    return digest.hexdigest()


def assert_one_line_error(result, *needles) -> None:
    """Exit code 2, exactly one `copal: error:` line on stderr naming the needles, no traceback."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("copal: error:"), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


TINY_TASK = "copal_test_tiny"


def write_jsonl(path, items) -> str:
    """Items in copal's canonical JSONL (keys sorted); returns the file's SHA-256."""
    content = b"".join(json.dumps(item, sort_keys=True).encode() + b"\n" for item in items)
    path.write_bytes(content)
    return hashlib.sha256(content).hexdigest()


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory):
    """A folder holding one local multiple-choice task YAML (lm-eval's `dataset_path: json`)
    over 8 items of Python code: which word continues the line."""
    folder = tmp_path_factory.mktemp("lm_tasks")
    stems = [("def parse(self, text):\n    return", [" self", " text", " None", " False"], 1),
             ("for index, item in", [" enumerate", " range", " print", " while"], 0),
             ("import", [" os", " (", " =", " 1"], 0),
             ("if value is", [" None", " def", " class", " 3"], 0),
             ("class Parser(", ["object", "1", "if", "return"], 0),
             ("raise ValueError(", ["\"bad value\")", "while", "else", "+"], 0),
             ("    except KeyError:\n        ", ["pass", "def", "import", "class"], 0),
             ("return self.", ["_items", "1", "(", "import"], 0)]
    items = [{"question": question, "choices": choices, "label": label} for question, choices, label in stems]
    sha256 = write_jsonl(folder / "tiny.jsonl", items)
    config = {"task": TINY_TASK, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(folder / "tiny.jsonl")},
                                 "cache_dir": str(tmp_path_factory.mktemp("hf_datasets"))},
              "output_type": "multiple_choice", "test_split": "test",
              "doc_to_text": "{{question}}", "doc_to_choice": "{{choices}}", "doc_to_target": "label",
              "target_delimiter": "",
              "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                              {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
              "metadata": {"version": 1.0}}
    (folder / "tiny.yaml").write_text(yaml.safe_dump(config))
    return folder, len(items), sha256


# ----------------------------------------------------------------------------- clusters (loopback only)


class LocalCluster:
    """A loopback cluster that one test module shares: started when a test first asks
    for its address (once it answers: no sleeping), checked at every later request and
    started afresh if it died (a long suite on a loaded machine can lose a Ray head),
    and stopped by the module's fixture at the end."""

    def __init__(self, start):
        self._start = start  # () -> a context manager yielding the runner address
        self._running = None
        self._address = None

    def address(self) -> str:
        from local_cluster import answers

        if self._address is not None and not answers(self._address):
            self.stop()
        if self._address is None:
            self._running = self._start()
            self._address = self._running.__enter__()
        return self._address

    def stop(self) -> None:
        if self._running is not None:
            running, self._running, self._address = self._running, None, None
            running.__exit__(None, None, None)


@pytest.fixture(scope="module")
def _ray_cluster():
    from local_cluster import ray_head

    cluster = LocalCluster(lambda: ray_head(cpus=2))
    yield cluster
    cluster.stop()


@pytest.fixture
def ray_head(_ray_cluster):
    """A Ray head on this machine (2 CPUs, loopback only), this module's; its Ray Client address."""
    return _ray_cluster.address()


@pytest.fixture(scope="module")
def _dask_cluster(prefect_api):
    from prefect.settings import PREFECT_API_URL

    from local_cluster import dask_cluster

    cluster = LocalCluster(lambda: dask_cluster(cpus=2, env=os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value()}))
    yield cluster
    cluster.stop()


@pytest.fixture
def dask_scheduler(_dask_cluster):
    """A Dask scheduler and one worker (2 threads, resources CPU=2) on 127.0.0.1, this
    module's, whose worker reports to the test Prefect API; the runner address."""
    return _dask_cluster.address()
