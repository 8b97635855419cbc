"""Commands on a run's recorded history: read it (history, report, verify), move
HEAD back (rollback), and take a step's model out (export)."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cli.app import TrustRemoteCode, command
from cli.console import err
from cli.logs import setup_logging


@command
def history(
    run: Annotated[Path, typer.Option(metavar="RUN_DIR", help="Run directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON rows instead of a table.")] = False,
    write: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Also write metrics.json and history.csv for "
                                                       "`dvc metrics` / `dvc plots` into this folder.")] = None,
    verify: Annotated[bool, typer.Option("--verify", help="Check every step's files against their recorded "
                                                          "SHA-256 first (exit 2 naming the first that differs).")]
    = False,
):
    """The audit table of every recorded step.

    Domain, data fingerprint, method, sparsity, PPLs, BWT, MLflow run id and DVC
    revision; * marks the steps of HEAD's lineage."""
    from flows.audit import history_rows

    setup_logging(False)
    if verify:
        from copal.verify import verify_run

        checked = verify_run(run)
        if checked["undigested"]:
            err.print(f"note: {checked['undigested']} step(s) recorded without file digests (an older copal): "
                      f"checked to be readable only", markup=False, highlight=False, soft_wrap=True)
    rows = history_rows(run)
    if write is not None:
        from flows.audit import write_dvc_metrics

        write_dvc_metrics(run, write)
    if as_json:
        print(json.dumps([row.as_json() for row in rows], indent=1))
        return
    table = Table(title=f"history of {run} (* = in HEAD's lineage)")
    for column in ("step", "parent", "domain", "data", "method", "sparsity", "PPL own", "avg PPL",
                   "BWT", "MLflow run", "DVC rev"):
        table.add_column(column, no_wrap=True)
    fmt = lambda value: "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)  # noqa: E731
    for row in rows:
        table.add_row(f"{row.step}{' *' if row.in_head_lineage else ''}{' HEAD' if row.head else ''}",
                      str(row.parent), row.domain, row.fingerprint[:8], f"{row.method}/{row.regime} {row.structure}",
                      fmt(row.sparsity), fmt(row.ppl_own), fmt(row.avg_ppl), fmt(row.bwt),
                      (row.mlflow_run_id or "-")[:8], (row.dvc_revision or "-")[:8])
    Console(width=max(Console().width, 150)).print(table)


@command
def rollback(
    run: Annotated[Path, typer.Option(metavar="RUN_DIR", help="Run directory.")],
    step: Annotated[int, typer.Option(metavar="K", help="Step id to make HEAD again.")],
):
    """Make an earlier step the head of the run again.

    Later steps stay in the history; the next step continues from this one."""
    from copal.rundir import RunDir, summarize
    from copal.state import write_json

    setup_logging(False)
    directory = RunDir(run).require()
    config, _ = directory.read_config()
    directory.step(step)
    with directory.lock():
        for state in directory.lineage(step):
            state.verify()
        previous = directory.head()
        directory.set_head(step)
        write_json(directory.metrics_path, summarize(directory, config).as_json())
    err.print(f"HEAD: step {previous} → step {step}")


@command
def verify(
    run: Annotated[Path, typer.Option(help="Run directory.")],
):
    """Check a whole run: every step's files against the SHA-256 its step.json records,
    HEAD, the lineages and the run's records. Exit 0 if all hold, 2 naming the first fault."""
    from copal.verify import verify_run

    setup_logging(False)
    checked = verify_run(run)
    print(f"{run}: {checked['steps']} step(s) verified"
          + (f", {checked['undigested']} recorded without digests (readable, not checked)"
             if checked["undigested"] else "") + f"; HEAD is step {checked['head']}")


@command
def export(
    run: Annotated[Path, typer.Option(metavar="RUN_DIR", help="Run directory.")],
    step: Annotated[int, typer.Option(metavar="K", help="Step id to export.")],
    out: Annotated[Path, typer.Option(metavar="DIR", help="Output model directory (must not exist or be empty).")],
    trust_remote_code: TrustRemoteCode = False,
):
    """The model after a step as a plain Hugging Face directory (safetensors).

    The step's files are checked against their recorded SHA-256 first."""
    from copal.export import export_step

    setup_logging(False)
    export_step(run, step, out, trust_remote_code)
    err.print(f"wrote {out}")


@command
def report(
    run: Annotated[Path, typer.Option(metavar="RUN_DIR", help="Run directory.")],
    out: Annotated[Optional[Path], typer.Option(
        metavar="DIR", help="HTML file to write. Default: RUN_DIR/report.html.")] = None,
):
    """An HTML report of a run's history (plots and the step table).

    The PPL matrix as a heat map, BWT after each step, realised sparsity per layer and the
    step table, along HEAD's lineage. One self-contained file: the plots are embedded and
    nothing is fetched when it opens."""
    from copal.report import write_report

    setup_logging(False)
    err.print(f"wrote {write_report(run, out)}")

