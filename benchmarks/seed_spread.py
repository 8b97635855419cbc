"""How much the benchmark's numbers move with the calibration sample.

`copal bench` runs every cell with calibration seed 0. This reruns a few of its
cells with other seeds (other calibration windows; the evaluation windows are
the same) and reports, per cell, average PPL and BWT for each seed with their
mean and spread, so that a difference between two cells of the grid can be
read against the noise of the calibration draw.

    python benchmarks/seed_spread.py [--seeds 0 1 2] [--cells copal-accumulate-u50 wanda-reprune-u50 ...]
        [--out reports/seed_spread.json]

Seed 0's cells are read from (or run into) reports/cells, the grid's own.
"""

import argparse
import json
import statistics
from pathlib import Path

from copal import grid as bench
from copal.allocator import limit_allocator_fragmentation
from copal.config import BENCH_CONFIG, load_config

DEFAULT_CELLS = ("copal-accumulate-u50", "wanda-accumulate-u50", "sparsegpt-accumulate-u50", "wanda-reprune-u50",
                 "copal-accumulate-u70", "wanda-reprune-u70")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cells", nargs="+", default=list(DEFAULT_CELLS))
    parser.add_argument("--grid", type=Path, default=Path("reports"), help="the grid's output folder (seed 0)")
    parser.add_argument("--out", type=Path, default=Path("reports/seed_spread.json"))
    args = parser.parse_args(argv)
    limit_allocator_fragmentation()  # as `copal bench`'s cells have it
    by_id = {cell.id: cell for cell in bench.full_grid()}
    unknown = [name for name in args.cells if name not in by_id]
    if unknown:
        parser.error(f"not cells of the grid: {', '.join(unknown)}")
    cells = [by_id[name] for name in args.cells]
    base = load_config(None, default=BENCH_CONFIG)
    results = {cell.id: {} for cell in cells}
    for seed in args.seeds:
        seeded = base.model_copy(update={"calibration": base.calibration.model_copy(update={"seed": seed})})
        out = args.grid if seed == base.calibration.seed else args.grid / "seeds" / f"seed{seed}"
        for cell in cells:  # one at a time, in this process (resumes what is recorded)
            bench.run_cell(bench.cell_config(seeded, cell), bench.cell_dir(out, cell), None, None)
            metrics = bench.cell_metrics(out, cell)
            results[cell.id][seed] = {"avg_ppl": metrics.avg_ppl, "bwt": metrics.bwt}
    summary = {}
    for cell_id, per_seed in results.items():
        entry = {"seeds": per_seed}
        for key in ("avg_ppl", "bwt"):
            values = [value[key] for value in per_seed.values()]
            entry[f"{key}_mean"] = statistics.fmean(values)
            entry[f"{key}_stdev"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[cell_id] = entry
        print(f"{cell_id:28s} avg PPL {entry['avg_ppl_mean']:.2f} ± {entry['avg_ppl_stdev']:.2f}   "
              f"BWT {entry['bwt_mean']:.3f} ± {entry['bwt_stdev']:.3f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": args.seeds, "cells": summary}, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
