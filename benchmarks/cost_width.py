"""How each method's pruning time grows with the model's width.

`copal bench` times the methods on the reference model, whose 256-wide layers
make SparseGPT's per-layer work (inverting the Hessian, the column-by-column
reconstruction) almost free. This benchmark runs one step of every method on
randomly initialised LLaMAs of growing hidden size (LLaMA-7B's MLP ratio, a few
blocks, the same calibration tokens) through the library, each in a fresh
process, and reports the pruning seconds per step and the ratios of copal to
wanda and to sparsegpt. Random weights time a step like trained ones.

    python benchmarks/cost_width.py [--widths 256 512 1024] [--layers 2] [--nsamples 32]
        [--out reports/cost_width.json]
"""

import argparse
import json
import tempfile
from pathlib import Path

from copal.records import StepRecord
from memory_step import run_step, save_random_llama, step_config

METHODS = ("magnitude", "wanda", "sparsegpt", "copal")


def step_cost(folder: Path, method: str, nsamples: int, seqlen: int) -> dict:
    """One step of `method` on folder/model, run (and its data cache) kept in folder/METHOD."""
    run_folder = folder / method
    run_folder.mkdir()
    report = run_step(run_folder, step_config(folder, method, nsamples, seqlen, seqlen * 4, method))[0]
    record = StepRecord.model_validate(report["record"])
    return {"prune_seconds": round(record.prune_seconds, 2), "step_seconds": round(record.seconds, 2),
            "peak_rss_mb": round(record.peak_rss_mb, 1)}


def main(argv=None) -> dict:
    from transformers import LlamaConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=32, help="calibration sequences")
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("reports/cost_width.json"))
    args = parser.parse_args(argv)
    rows = []
    for width in args.widths:
        shape = LlamaConfig(hidden_size=width, intermediate_size=int(width * 2.6875), num_hidden_layers=args.layers,
                            num_attention_heads=max(1, width // 64), num_key_value_heads=max(1, width // 64),
                            vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            save_random_llama(folder, shape)
            costs = {method: step_cost(folder, method, args.nsamples, args.seqlen) for method in METHODS}
        prune = {method: cost["prune_seconds"] for method, cost in costs.items()}
        row = {"hidden": width, "intermediate": shape.intermediate_size, "layers": args.layers, "methods": costs,
               "copal_over_wanda": round(prune["copal"] / prune["wanda"], 3),
               "copal_over_sparsegpt": round(prune["copal"] / prune["sparsegpt"], 3)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {"calibration_tokens": args.nsamples * args.seqlen, "widths": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
