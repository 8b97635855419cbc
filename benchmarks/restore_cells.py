"""Restore a benchmark's finished cells from its committed benchmark.json, so that
`copal bench` resumes the grid and runs only the cells added since.

The cells' run directories (OUT/cells/<cell>) are not committed: they hold every step's
masks and state, gigabytes for a real LLM. benchmark.json holds what the report needs of
each finished cell (its PPL matrix, BWT, average PPL and per-step cost); this writes it
back as OUT/cells/<cell>/metrics.json. A cell whose directory exists is left alone.

`--run CELL=DIR` also takes a cell's metrics from a finished run made outside the grid
(`copal run --out DIR`), once its recorded config is checked to be the cell's own apart
from the run's name.

    python benchmarks/restore_cells.py --config configs/smollm2.yaml --out reports/smollm2 \\
        --run copal-accumulate-u50-hessian=reports/default/smollm2-u50
"""

import argparse
import json
import sys
from pathlib import Path

from copal.errors import InputError
from copal.config import RunConfig
from copal.grid import Cell, cell_config, cell_dir, plan
from copal.records import RunMetrics
from copal.rundir import RunDir


def from_benchmark(out_dir: Path) -> dict[str, RunMetrics]:
    """Each finished cell of OUT/benchmark.json as the metrics.json its run wrote."""
    summary = json.loads((out_dir / "benchmark.json").read_text())
    setup = summary["setup"]
    return {cell["id"]: RunMetrics(model=setup["model"], seqlen=setup["evaluation"]["seqlen"],
                                   **{key: cell[key] for key in ("method", "regime", "structure", "sparsity", "domains",
                                                                 "dense_ppl", "ppl", "bwt", "avg_ppl", "steps")})
            for cell in summary["cells"]}


def from_run(cell_id: str, run_dir: Path, base: RunConfig, cells: list[Cell]) -> RunMetrics:
    """A finished run's metrics, if its config is the grid cell's apart from the name."""
    cell = next((cell for cell in cells if cell.id == cell_id), None)
    if cell is None:
        sys.exit(f"--run {cell_id}: not a cell of the grid")
    try:
        recorded = RunDir(run_dir).read_config()[0].model_dump(exclude={"name"})
    except (InputError, OSError) as error:
        sys.exit(f"--run {cell_id}={run_dir}: {error}")
    expected = cell_config(base, cell).model_dump(exclude={"name"})
    if recorded != expected:
        differ = sorted(key for key in expected if recorded.get(key) != expected[key])
        sys.exit(f"--run {cell_id}={run_dir}: its config differs from the cell's in {', '.join(differ)}")
    return RunMetrics.model_validate_json((run_dir / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the grid's bench config")
    parser.add_argument("--out", type=Path, required=True, help="the benchmark's output folder (has benchmark.json)")
    parser.add_argument("--run", action="append", default=[], metavar="CELL=DIR",
                        help="a cell's metrics from a finished `copal run` with the cell's config")
    args = parser.parse_args()
    base, _, cells = plan(args.config, quick=False)
    restored = from_benchmark(args.out)
    for item in args.run:
        cell_id, _, run_dir = item.partition("=")
        restored[cell_id] = from_run(cell_id, Path(run_dir), base, cells)
    for cell in cells:
        metrics, directory = restored.get(cell.id), cell_dir(args.out, cell)
        if metrics is None or directory.exists():
            continue
        directory.mkdir(parents=True)
        (directory / "metrics.json").write_text(json.dumps(metrics.as_json(), indent=1) + "\n")
        print(f"restored {cell.id}")


if __name__ == "__main__":
    main()
