"""Time and peak memory of one copal step on a model of TinyLlama-1.1B's shape.

Builds a randomly initialised LLaMA with TinyLlama-1.1B's shape (hidden 2048,
MLP 5632, 22 blocks, 32 heads, 4 KV heads, 32k vocabulary), saves it as sharded
safetensors (500 MB shards, as hub checkpoints come) with a tokenizer trained on
the fly, and runs one copal/accumulate step with a small calibration set
(8 × 128 tokens) through the library in a fresh process (memory_step.run_step). Reports the step's seconds
and its peak RSS (and the whole process's) divided by the model's bytes on disk.
Random weights time and size the step like trained ones; the PPLs mean nothing.

The full shape needs about 4.4 GB on disk and several times that in memory and
runs for a long time on a CPU; the flags shrink it for a smoke test:

    python benchmarks/scale_step.py [--layers 22] [--hidden 2048] [--intermediate 5632] [--heads 32]
        [--kv-heads 4] [--shard-size 500MB] [--out reports/scale_step.json]
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from memory_step import run_step, save_random_llama, step_config, step_figures


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--shard-size", default="500MB", help="max_shard_size of save_pretrained")
    parser.add_argument("--nsamples", type=int, default=8, help="calibration sequences")
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per calibration sequence and eval window")
    parser.add_argument("--eval-tokens", type=int, default=1024, help="evaluation tokens")
    parser.add_argument("--out", type=Path, default=Path("reports/scale_step.json"))
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    from transformers import LlamaConfig

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    shape = {"hidden_size": args.hidden, "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
             "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads, "vocab_size": args.vocab}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        parameter_bytes = save_random_llama(folder, LlamaConfig(**shape, max_position_embeddings=2048,
                                                                tie_word_embeddings=False), args.shard_size)
        shards = sorted((folder / "model").glob("*.safetensors"))
        disk_bytes = sum(file.stat().st_size for file in shards)
        config = step_config(folder, "scale", args.nsamples, args.seqlen, args.eval_tokens)
        report, process_peak_mb = run_step(folder, config)
    disk_mb = disk_bytes / 2**20
    result = {"shape": shape, "parameter_mb": round(parameter_bytes / 2**20, 1), "shards": len(shards),
              "disk_mb": round(disk_mb, 1), "calibration_tokens": args.nsamples * args.seqlen,
              **step_figures(report, process_peak_mb, disk_mb),
              "command": "python benchmarks/scale_step.py" + (" " + " ".join(argv) if argv else "")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
