"""`copal bench`: the benchmark grid, and its cells as a table."""

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cli.app import TrackingUri, Verbose, command
from cli.console import err, progress_bar
from cli.logs import setup_logging
from flows.api import TemporaryApi


@command
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="A few cells on 3 domains with less calibration and "
                                                        "evaluation data: a smoke test of a few minutes.")] = False,
    out: Annotated[Optional[Path], typer.Option(
        metavar="DIR", help="Output folder. Default: reports (reports/quick with "
                            "--quick).")] = None,
    runner: Annotated[str, typer.Option(
        metavar="RUNNER", help="Where the cells run: local (this machine), ray://HOST:PORT (a Ray "
                               "cluster's client port) or dask://HOST:PORT (a Dask scheduler). "
                               "A cluster needs PREFECT_API_URL (a Prefect server).")] = "local",
    jobs: Annotated[Optional[int], typer.Option(
        metavar="N", help="Cells run at once (--runner local). Default: as many as "
                          "fit in the available memory, at most one per core.")] = None,
    config: Annotated[Optional[Path], typer.Option(metavar="YAML", help="Base run config (model, domains, calibration, "
                                                        "evaluation). Default: configs/bench.yaml (the demo's "
                                                        "sequence, lighter evaluation).")] = None,
    tracking_uri: TrackingUri = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="Run nothing: write OUT/benchmark.{json,md} "
                                                                    "and the plots from the cells finished so far "
                                                                    "(the rest listed as not yet run).")] = False,
    verbose: Verbose = False,
):
    """The benchmark grid (methods × regimes × structures) → OUT/benchmark.{json,md} and plots.

    By default: methods magnitude, wanda, sparsegpt, copal × regimes sequential, reprune,
    accumulate, joint × structures 50 % unstructured, 2:4, 4:8, plus a 60/70 % sparsity sweep
    for magnitude, wanda and copal, the COPAL variants (loss sensitivity, no normalisation,
    max) at 50 and 70 %, and the dense model, on the config's domain sequence. A `grid:`
    section in the config narrows or widens this (structures, sweep, variants, cells), sets
    each cell's resources (cpus, memory_gb, gpus) and can add lm-eval task accuracy of
    chosen cells' final models (configs/smollm2.yaml shows the keys). Magnitude uses no
    data, so it runs once per structure. One cell per method runs alone first, for the cost
    comparison. The grid is a Prefect flow, each cell a task and an MLflow child run of the
    grid's run; each cell is a run in OUT/cells/<cell>: an interrupted grid resumes where it
    stopped and finished cells are not recomputed."""
    setup_logging(verbose)
    api = TemporaryApi() if runner == "local" and not report_only else None
    from flows import bench as bench_flow

    with progress_bar() as report:
        summary, written = bench_flow.run_benchmark(config, out, quick, jobs, runner=runner,
                                                    tracking_uri=tracking_uri, api=api, progress=report,
                                                    report_only=report_only)
    fmt = lambda value: "-" if value is None else f"{value:.2f}"  # noqa: E731
    table = Table(title="benchmark cells")
    for column in ("cell", "avg PPL", "BWT", "s/step", "peak MB"):
        table.add_column(column, justify="left" if column == "cell" else "right")
    if summary.dense:
        table.add_row("dense", fmt(summary.dense.avg_ppl), "-", "-", "-")
    for cell in summary.cells:
        steps = cell.steps
        table.add_row(cell.id, fmt(cell.avg_ppl), fmt(cell.bwt), f"{sum(s.seconds for s in steps) / len(steps):.1f}",
                      f"{max(s.peak_rss_mb for s in steps):.0f}")
    Console().print(table)
    err.print(f"wrote {', '.join(str(path) for path in written[:2])} and {len(written) - 2} plot(s)")

