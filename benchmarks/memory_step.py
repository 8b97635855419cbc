"""Peak memory of one copal step relative to the dense model's size.

Builds a randomly initialised 12-block LLaMA (hidden 512, LLaMA-7B's ratios,
32k vocabulary), saves it as safetensors, and runs one copal/accumulate step
(64 × 256 calibration tokens) through the library in a fresh process. Reports
the step's peak RSS (from step.json: the high-water mark from the start of the
step, model already loaded) and the whole process's peak RSS, each divided by
the dense model's bytes, and the RSS of the interpreter and libraries alone
(after imports), which does not shrink with the model. The target for the step
is below 2.0. Blocks stream from the checkpoint (copal.streaming) whenever the
library can, as in a normal run.

    python benchmarks/memory_step.py [--layers 12] [--hidden 512] [--out reports/memory_step.json]
"""

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml


def train_tokenizer(folder: Path):
    """A 2k byte-level BPE tokenizer trained on stdlib sources, and the corpus file (folder/corpus.txt)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    import argparse as text_a, collections as text_b, difflib as text_c, logging as text_d

    corpus = folder / "corpus.txt"
    corpus.write_text("\n\n".join(inspect.getsource(m) for m in (text_a, text_b, text_c, text_d)))
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train([str(corpus)], trainers.BpeTrainer(vocab_size=2048, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>"), corpus


def save_random_llama(folder: Path, config, max_shard_size: str | None = None) -> int:
    """A randomly initialised LLaMA and a trained tokenizer in folder/model; returns the
    model's parameter bytes. The model is freed before returning."""
    from transformers import LlamaForCausalLM

    tokenizer, _ = train_tokenizer(folder)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    shards = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder / "model", safe_serialization=True, **shards)
    tokenizer.save_pretrained(folder / "model")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def _child(config_path: Path, out: Path) -> None:
    """In the fresh process: RSS after imports, after loading, then one library step."""
    import copal.continual as continual
    from copal.config import load_config
    from copal.allocator import limit_allocator_fragmentation

    limit_allocator_fragmentation()  # as the command line does
    after_imports = _rss_mb()
    run = continual.ContinualRun(load_config(config_path), out)
    after_load = _rss_mb()
    record = run.step(0)
    written = sum(file.stat().st_size for file in (out / "steps" / str(record.step)).rglob("*") if file.is_file())
    print(json.dumps({"after_imports_mb": after_imports, "after_load_mb": after_load, "record": record.as_json(),
                      "streaming": run.session.execution.streamed, "step_bytes_written": written,
                      "child_peak_mb": _hwm_mb()}))


def _hwm_mb() -> float:
    """This process's own RSS high-water mark since the step began (PeakMemory resets it there;
    before, only the smaller load). RUSAGE_CHILDREN in the parent is not it: a forked child
    starts with the parent's RSS, and the parent may still hold the model it saved."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 1024


def step_config(folder: Path, name: str, nsamples: int, seqlen: int, eval_tokens: int,
                method: str = "copal") -> dict:
    """A one-domain run of folder/model on folder/corpus.txt (what save_random_llama
    writes): accumulate regime, except magnitude, which has no data to accumulate."""
    return {"name": name, "model": str(folder / "model"), "domains": [f"text:{folder / 'corpus.txt'}"],
            "method": method, "regime": "reprune" if method == "magnitude" else "accumulate",
            "calibration": {"nsamples": nsamples, "seqlen": seqlen},
            "evaluation": {"seqlen": seqlen, "max_tokens": eval_tokens}, "device": "cpu"}


def run_step(folder: Path, config: dict) -> tuple[dict, float]:
    """One step of `config` (one domain) through the library, in a fresh process
    with nothing but copal imported (no Prefect/MLflow: their cost is not the
    pruning's); returns (the child's report with step 1's record, its peak RSS in MB)."""
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "COPAL_DATA_DIR": str(folder / "arrow"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, __file__, "--child", str(folder / "config.yaml"), str(folder / "run")],
                            check=True, env=env, capture_output=True, text=True)
    process_peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return json.loads(result.stdout.strip().splitlines()[-1]), process_peak_mb


def step_figures(report: dict, process_peak_mb: float, disk_mb: float) -> dict:
    """What a scale benchmark reports of one `run_step`: time, RSS at each stage, its
    ratio to the model's bytes on disk, streaming, and the bytes the step wrote."""
    from copal.records import StepRecord

    step = StepRecord.model_validate(report["record"])
    return {"step_seconds": round(step.seconds, 1), "prune_seconds": round(step.prune_seconds, 1),
            "rss_after_imports_mb": round(report["after_imports_mb"], 1),
            "rss_after_load_mb": round(report["after_load_mb"], 1),
            "step_peak_rss_mb": round(step.peak_rss_mb, 1), "process_peak_rss_mb": round(process_peak_mb, 1),
            "step_peak_over_disk": round(step.peak_rss_mb / disk_mb, 3),
            "process_peak_over_disk": round(process_peak_mb / disk_mb, 3),
            "streaming": report["streaming"], "step_mb_written": round(report["step_bytes_written"] / 2**20, 1)}


def build(folder: Path, layers: int, hidden: int) -> int:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.6875), num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=32000,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    return save_random_llama(folder, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--out", type=Path, default=Path("reports/memory_step.json"))
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(*args.child)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        dense_bytes = build(folder, args.layers, args.hidden)
        report, process_peak_mb = run_step(folder, step_config(folder, "memory", 64, 256, 4096))
    step = report["record"]
    dense_mb = dense_bytes / 2**20
    result = {"layers": args.layers, "hidden": args.hidden, "dense_mb": round(dense_mb, 1),
              "rss_after_imports_mb": round(report["after_imports_mb"], 1),
              "rss_after_load_mb": round(report["after_load_mb"], 1),
              "step_peak_rss_mb": round(step["peak_rss_mb"], 1), "process_peak_rss_mb": round(process_peak_mb, 1),
              "step_over_imports_ratio": round((step["peak_rss_mb"] - report["after_imports_mb"]) / dense_mb, 3),
              "step_ratio": round(step["peak_rss_mb"] / dense_mb, 3),
              "process_ratio": round(process_peak_mb / dense_mb, 3),
              "step_seconds": round(step["seconds"], 1), "prune_seconds": round(step["prune_seconds"], 1),
              "streaming": report["streaming"], "step_mb_written": round(report["step_bytes_written"] / 2**20, 1),
              "command": "python benchmarks/memory_step.py" + (f" --layers {args.layers}" if args.layers != 12 else "")
              + (f" --hidden {args.hidden}" if args.hidden != 512 else "")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
