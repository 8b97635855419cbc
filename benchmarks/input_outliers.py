"""Are there outlier input features? The spread of each pruned layer's input-channel norms.

Wanda's advantage over magnitude pruning comes from a few input channels whose
activations are far larger than the rest (emergent in LLMs of several billion
parameters). This measures, for every pruned layer of a model, ‖x_j‖₂ over the
calibration tokens of one domain (Wanda's own statistic, `InputEnergy`), and reports max/median across channels and
the share of the total energy in the top 1 % of channels. Uniform channels
(max/median near 1) make |W|·‖x‖ rank almost like |W|.

    python benchmarks/input_outliers.py [--model data/models/reference] [--data builtin:docs]
        [--nsamples 16] [--out reports/input_outliers.json]
"""

import argparse
import json
import statistics
from pathlib import Path

import torch

from copal.calibrate import BlockStatistics
from copal.data import ingest
from copal.windows import calibration_samples
from copal.methods import InputEnergy
from copal.model import all_prunable, load_model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "data/models/reference"))
    parser.add_argument("--data", default="builtin:docs")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("reports/input_outliers.json"))
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model)
    batch = calibration_samples(ingest(args.data), tokenizer, args.nsamples, args.seqlen, 0)
    modules = all_prunable(model)
    energy = BlockStatistics(modules, InputEnergy, torch.device("cpu"))
    with torch.no_grad():
        model(input_ids=batch, use_cache=False)
    energy.close()
    layers = {}
    for name, value in energy.values().items():
        norms = value.sqrt()
        top = norms.sort(descending=True).values[: max(1, len(norms) // 100)]
        layers[name] = {"max_over_median": round(float(norms.max() / norms.median()), 2),
                        "top1pct_energy_share": round(float(top.square().sum() / value.sum()), 4)}
    ratios = [layer["max_over_median"] for layer in layers.values()]
    result = {"model": args.model, "data": args.data, "tokens": args.nsamples * args.seqlen,
              "median_max_over_median": statistics.median(ratios), "largest_max_over_median": max(ratios),
              "layers": layers}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "layers"}, indent=1))
    return result


if __name__ == "__main__":
    main()
