"""One streamed copal step on a random model of LLaMA-2-7B's shape, on a 24 GiB machine.

Writes a randomly initialised LLaMA with LLaMA-2-7B's shape (hidden 4096, 32
blocks, MLP 11008, 32 heads, 32k vocabulary) straight to bf16 safetensors
shards (2 GB each, as hub checkpoints come), one tensor at a time, so the model
is never whole in memory, not even here; then runs one copal step with a small
calibration set through the library in a fresh process
(memory_step.run_step), blocks streamed from the shards and computed in the
config's dtype. Reports the step's peak RSS, seconds per block of the pruning
pass and the bytes the step wrote. Random weights time and size the step like
trained ones; the PPLs mean nothing.

Needs about 13.5 GB of disk for the model plus what the step writes (the
`accumulate` regime records the accumulated statistic: 4 bytes per prunable
weight; `reprune` records masks only); the model and the run are deleted
afterwards.

    python benchmarks/scale_7b.py [--layers 32] [--regime accumulate] [--method copal] [--hessian float32] [--dtype float32]
        [--nsamples 4] [--seqlen 128] [--eval-tokens 512] [--work DIR] [--out reports/scale_7b.json]
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from memory_step import run_step, step_config, step_figures, train_tokenizer


def write_random_checkpoint(folder: Path, config, dtype: torch.dtype, shard_bytes: int) -> int:
    """A random LLaMA written as safetensors shards one tensor at a time
    (normal(0, 0.02), norms 1); returns the bytes on disk."""
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    files = []

    def flush():
        files.append(folder / f"part-{len(files):05d}.safetensors")
        save_file(shards[-1], str(files[-1]), metadata={"format": "pt"})
        shards[-1] = {}

    for name, tensor in skeleton.state_dict().items():
        if name.endswith("norm.weight"):
            value = torch.ones(tensor.shape, dtype=dtype)
        else:
            value = torch.empty(tensor.shape, dtype=torch.float32).normal_(0, 0.02, generator=generator).to(dtype)
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            flush()
            size = 0
        shards[-1][name] = value
        size += nbytes
    flush()
    weight_map = {}
    for number, file in enumerate(files, 1):
        final = folder / f"model-{number:05d}-of-{len(files):05d}.safetensors"
        file.rename(final)
        from safetensors import safe_open

        with safe_open(str(final), "pt") as handle:
            weight_map.update({key: final.name for key in handle.keys()})
    total = sum(file.stat().st_size for file in folder.glob("*.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.dtype = dtype
    config.save_pretrained(folder)
    return total


def main(argv=None) -> dict:
    from transformers import LlamaConfig

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--regime", default="accumulate")
    parser.add_argument("--method", default="copal")
    parser.add_argument("--hessian", default="float32", help="state.hessian: how an accumulated Hessian is stored")
    parser.add_argument("--dtype", default="float32", help="compute dtype of the step (the shards are bf16)")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--eval-tokens", type=int, default=512)
    parser.add_argument("--shard-gb", type=float, default=2.0)
    parser.add_argument("--work", type=Path, default=None, help="where the model and run go (default: a temp dir)")
    parser.add_argument("--out", type=Path, default=Path("reports/scale_7b.json"))
    args = parser.parse_args(argv)
    shape = {"hidden_size": args.hidden, "intermediate_size": args.intermediate, "num_hidden_layers": args.layers,
             "num_attention_heads": args.hidden // 128, "num_key_value_heads": args.hidden // 128,
             "vocab_size": 32000}
    folder = Path(tempfile.mkdtemp(dir=args.work, prefix="scale7b-"))
    try:
        started = time.perf_counter()
        tokenizer, _ = train_tokenizer(folder)
        (folder / "model").mkdir()
        disk_bytes = write_random_checkpoint(folder / "model", LlamaConfig(**shape, max_position_embeddings=4096,
                                                                          tie_word_embeddings=False),
                                             torch.bfloat16, int(args.shard_gb * 1e9))
        tokenizer.save_pretrained(folder / "model")
        build_seconds = time.perf_counter() - started
        config = step_config(folder, "scale7b", args.nsamples, args.seqlen, args.eval_tokens, args.method)
        config |= {"regime": args.regime, "dtype": args.dtype, "state": {"hessian": args.hessian}}
        report, process_peak_mb = run_step(folder, config)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    step = report["record"]
    disk_mb = disk_bytes / 2**20
    block = args.hidden * (4 * args.hidden + 3 * args.intermediate)  # q, k, v, o; gate, up, down
    result = {"shape": shape, "stored_dtype": "bfloat16", "compute_dtype": args.dtype, "regime": args.regime,
              "method": args.method, "state_hessian": args.hessian,
              "step_bytes_over_fp16_prunable": round(report["step_bytes_written"] / (2 * block * args.layers), 4),
              "shards": -(-disk_bytes // int(args.shard_gb * 1e9)), "disk_mb": round(disk_mb, 1),
              "calibration_tokens": args.nsamples * args.seqlen, "eval_tokens": args.eval_tokens,
              "build_seconds": round(build_seconds, 1), **step_figures(report, process_peak_mb, disk_mb),
              "prune_seconds_per_block": round(step["prune_seconds"] / args.layers, 2),
              "command": "python benchmarks/scale_7b.py" + (" " + " ".join(argv) if argv else "")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
