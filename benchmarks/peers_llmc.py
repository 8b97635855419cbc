"""llm-compressor's side of benchmarks/peers.py: one oneshot pruning run, in its own venv.

Runs under benchmarks/.venv-peers/bin/python (made by benchmarks/peers_setup.sh),
never in the project's .venv, and imports nothing from copal. Reads the
calibration windows benchmarks/peers.py wrote (copal's own token ids), prunes
the model with llm-compressor's WandaPruningModifier or SparseGPTModifier
through `oneshot` (sequential pipeline, on the CPU), and saves the pruned model
as dense safetensors with its tokenizer.

    python benchmarks/peers_llmc.py --model DIR --windows windows.json \
        --method wanda|sparsegpt --structure unstructured|2:4 --out DIR --result result.json

The result JSON holds the pruning call's process CPU seconds and wall seconds,
the process's peak RSS (VmHWM) until the end of pruning and from the start of
the call, the library versions, and what the model saw of the calibration data.
"""

import argparse
import json
import time
from importlib import metadata
from pathlib import Path

import torch

from proc_memory import reset_peak, status_mb  # a sibling module (benchmarks/ is sys.path[0])

VERSIONS = ("llmcompressor", "compressed-tensors", "torch", "transformers", "datasets", "accelerate", "auto-round")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", type=Path, required=True)
    parser.add_argument("--method", choices=("wanda", "sparsegpt"), required=True)
    parser.add_argument("--structure", choices=("unstructured", "2:4"), required=True)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--dampening", type=float, default=0.01)
    parser.add_argument("--no-attention-mask", action="store_true",
                        help="diagnostic: give the dataset input_ids only (copal passes no attention mask)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--result", type=Path, required=True)
    args = parser.parse_args()

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rss_after_imports = status_mb("VmRSS")
    windows = json.loads(args.windows.read_text())
    input_ids = windows["input_ids"]
    nsamples, seqlen = len(input_ids), len(input_ids[0])

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_safetensors=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    columns = {"input_ids": input_ids}
    if not args.no_attention_mask:
        columns["attention_mask"] = [[1] * seqlen] * nsamples
    dataset = Dataset.from_dict(columns)

    # Every sequence the embedding sees (the calibration pass and the propagation pass).
    seen: list[list[int]] = []
    embed = model.get_input_embeddings()
    handle = embed.register_forward_pre_hook(lambda module, inputs: seen.extend(inputs[0].tolist()))

    common = {"sparsity": args.sparsity, "mask_structure": "2:4" if args.structure == "2:4" else "0:0",
              "targets": [r"re:model\.layers\.\d+$"], "ignore": ["re:.*lm_head"]}
    if args.method == "wanda":
        modifier = WandaPruningModifier(**common)
    else:
        modifier = SparseGPTModifier(**common, block_size=args.block_size, dampening_frac=args.dampening)

    rss_after_load = status_mb("VmRSS")
    peak_before = status_mb("VmHWM")
    reset_peak()
    cpu, wall = time.process_time(), time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=modifier,
            num_calibration_samples=nsamples, shuffle_calibration_samples=False, batch_size=args.batch_size,
            max_seq_length=seqlen, pipeline="sequential", sequential_offload_device="cpu")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    prune_peak = status_mb("VmHWM")
    handle.remove()

    first_pass = seen[:nsamples]
    result = {
        "tool": "llm-compressor", "method": args.method, "structure": args.structure,
        "prune_cpu_seconds": cpu, "wall_seconds": wall,
        "peak_rss_mb": max(peak_before, prune_peak), "prune_peak_rss_mb": prune_peak,
        "rss_after_imports_mb": rss_after_imports, "rss_after_load_mb": rss_after_load,
        "threads": torch.get_num_threads(), "attention_mask": not args.no_attention_mask,
        "calibration_sequences_seen": len(seen),
        "calibration_same_windows": sorted(first_pass) == sorted(input_ids),
        "calibration_same_order": first_pass == input_ids,
        "versions": {name: metadata.version(name) for name in VERSIONS},
        "modifier": modifier.model_dump(mode="json", exclude_none=True),
    }

    # Dense safetensors (save_compressed=False: no sparse bitmask format) and the tokenizer.
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), save_compressed=False)
    tokenizer.save_pretrained(str(args.out))
    args.result.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "modifier"}), flush=True)


if __name__ == "__main__":
    main()
