"""How much does a 4-bit grid tie weight magnitudes? Per-row |w| ties in each pruned layer.

A model un-quantised from GGUF (`copal import-gguf`) has weights on a coarse grid:
Q4_1 stores blocks of 32 consecutive inputs of a row as d·q + m with q in 0..15,
so a row of n inputs holds at most 16·n/32 distinct values. Magnitude pruning
ranks |w| within a row; every tie at the threshold is then decided by index
order (the stable sort in `copal.masks`), not by the weights. For every prunable
layer (the Linear layers of the decoder blocks) this reports:

* tied_fraction: the share of weights whose |w| equals another |w| of the same row;
* distinct_per_row: the number of distinct |w| in a row (median, min, max over rows);
* at the per-row magnitude threshold of --sparsity (k = round(sparsity·n) pruned per
  row, threshold = the k-th smallest |w| of the row): how many weights of a row have
  exactly that |w| (median and mean per row), the share of rows where the tie straddles
  the boundary (the k-th and (k+1)-th smallest |w| are equal, so some tied weights are
  pruned and some kept), and how many weights such straddling ties hold in all: their
  keep/prune decision is the tie-break's.

    python benchmarks/gguf_ties.py [--model data/models/smollm2-135m] [--sparsity 0.5]
        [--out reports/smollm2_ties.json]
"""

import argparse
import json
import re
import statistics
from pathlib import Path

import torch

from copal.masks import Structure
from copal.model import all_prunable, load_model, weight_matrix


def row_ties(weight: torch.Tensor, pruned_per_row: int) -> dict:
    """Tie statistics of |w| along each row of an (out, in) matrix."""
    magnitude = weight.detach().float().abs()
    ordered = magnitude.sort(dim=1).values
    equal_next = ordered[:, 1:] == ordered[:, :-1]
    tied = torch.zeros_like(ordered, dtype=torch.bool)
    tied[:, 1:] |= equal_next
    tied[:, :-1] |= equal_next
    distinct = 1 + (~equal_next).sum(dim=1)
    k = pruned_per_row
    threshold = ordered[:, k - 1]
    at_threshold = (magnitude == threshold[:, None]).sum(dim=1)
    straddling = ordered[:, k - 1] == ordered[:, k]
    return {
        "shape": list(weight.shape),
        "tied_fraction": round(float(tied.float().mean()), 4),
        "distinct_per_row": {"median": int(distinct.median()), "min": int(distinct.min()),
                             "max": int(distinct.max())},
        "pruned_per_row": k,
        "at_threshold_per_row": {"median": int(at_threshold.median()),
                                 "mean": round(float(at_threshold.float().mean()), 2),
                                 "max": int(at_threshold.max())},
        "straddling_rows_fraction": round(float(straddling.float().mean()), 4),
        "weights_decided_by_tiebreak": int(at_threshold[straddling].sum()),
        "weights": weight.numel(),
        "rows": weight.shape[0],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="data/models/smollm2-135m")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--out", type=Path, default=Path("reports/smollm2_ties.json"))
    args = parser.parse_args(argv)
    model, _ = load_model(args.model)
    structure = Structure(args.sparsity)
    layers = {}
    for name, module in all_prunable(model).items():
        weight = weight_matrix(module)
        layers[name] = row_ties(weight, structure.pruned_per_row(weight.shape[1]))

    def summary(entries: list[dict]) -> dict:
        weights = sum(e["weights"] for e in entries)
        rows = sum(e["rows"] for e in entries)
        return {
            "layers": len(entries),
            "weights": weights,
            "tied_fraction": round(sum(e["tied_fraction"] * e["weights"] for e in entries) / weights, 4),
            "distinct_per_row_median": statistics.median(e["distinct_per_row"]["median"] for e in entries),
            "in_features": sorted({e["shape"][1] for e in entries}),
            "at_threshold_per_row_mean": round(sum(e["at_threshold_per_row"]["mean"] * e["rows"]
                                                   for e in entries) / rows, 2),
            "at_threshold_per_row_median": statistics.median(e["at_threshold_per_row"]["median"] for e in entries),
            "straddling_rows_fraction": round(sum(e["straddling_rows_fraction"] * e["rows"]
                                                  for e in entries) / rows, 4),
            "weights_decided_by_tiebreak": sum(e["weights_decided_by_tiebreak"] for e in entries),
            "weights_decided_by_tiebreak_fraction": round(sum(e["weights_decided_by_tiebreak"]
                                                              for e in entries) / weights, 4),
        }

    by_kind = {}
    for name, entry in layers.items():
        by_kind.setdefault(re.sub(r"^.*\.\d+\.", "", name), []).append(entry)
    source = Path(args.model) / "gguf_source.json"
    result = {
        "model": args.model,
        "gguf_source": json.loads(source.read_text()) if source.is_file() else None,
        "sparsity": args.sparsity,
        "all": summary(list(layers.values())),
        "by_kind": {kind: summary(entries) for kind, entries in by_kind.items()},
        "layers": layers,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({key: result[key] for key in ("model", "sparsity", "all", "by_kind")}, indent=1))
    return result


if __name__ == "__main__":
    main()
