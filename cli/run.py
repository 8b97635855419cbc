"""Commands that compute steps: a run (or several), one more step, the scheduled
step, and the replay of a recorded step."""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cli.app import TrackingUri, TrustRemoteCode, Verbose, command, fail, note
from cli.console import next_steps, progress_bar
from cli.logs import setup_logging
from copal.errors import InputError
from copal.records import RunMetrics
from flows.api import TemporaryApi


def print_summary(metrics: RunMetrics) -> None:
    """The PPL matrix (dense row first), BWT and average PPL."""
    table = Table(title=f"{metrics.method}/{metrics.regime}, {metrics.structure}, "
                        f"sparsity {metrics.sparsity:g}: perplexity after each step")
    table.add_column("after")
    for name in metrics.domains:
        table.add_column(name, justify="right")
    table.add_column("s", justify="right")
    table.add_column("peak MB", justify="right")
    fmt = lambda value: "-" if value is None else f"{value:.2f}"  # noqa: E731
    table.add_row("dense", *[fmt(v) for v in metrics.dense_ppl], "", "")
    for row, step in zip(metrics.ppl, metrics.steps):
        table.add_row(step.label, *[fmt(v) for v in row], f"{step.seconds:.1f}", f"{step.peak_rss_mb:.0f}")
    console = Console()
    console.print(table)
    console.print(f"BWT {fmt(metrics.bwt)}   average PPL {fmt(metrics.avg_ppl)}")


@command
def run(
    configs: Annotated[Optional[list[Path]], typer.Argument(
        metavar="CONFIG", help="Run configs (YAML). Default: the offline demo config.")] = None,
    sweep: Annotated[list[str], typer.Option(
        metavar="KEY=V1,V2,…", help="KEY=V1,V2,...: one run per value (repeat the option: every "
                                    "combination). Each run is named <name>-KEY-VALUE.")] = [],
    set_: Annotated[list[str], typer.Option(
        "--set", metavar="KEY=VALUE", help="Override a config key in every run: key=value or "
                                           "a.b=value.")] = [],
    runner: Annotated[str, typer.Option(
        metavar="RUNNER", help="Where the runs go: local (this machine, one at a time), "
                               "ray://HOST:PORT or dask://HOST:PORT (a cluster, at once). A cluster "
                               "needs PREFECT_API_URL (a Prefect server).")] = "local",
    cpus: Annotated[Optional[int], typer.Option(
        metavar="N", help="Each run's torch threads (and CPUs reserved on a cluster). "
                          "Default: as this process has them, on a cluster too.")] = None,
    memory_gb: Annotated[Optional[float], typer.Option(
        metavar="GB", help="Memory each run reserves on a cluster.")] = None,
    gpus: Annotated[float, typer.Option(metavar="G", help="GPUs each run reserves on a cluster.")] = 0,
    out: Annotated[Optional[Path], typer.Option(
        metavar="DIR", help="Run directory. Default: runs/<name>. With several runs "
                            "(several configs or --sweep): the folder their run "
                            "directories go in, OUT/<run name>; default runs.")] = None,
    tracking_uri: TrackingUri = None,
    verbose: Verbose = False,
):
    """A continual run over the config's domains (Prefect flow, MLflow, DVC); or several.

    Several configs and/or --sweep: one run per config × sweep value, each checked before
    any runs, as one Prefect flow of runs on --runner. Rerunning the same command resumes
    each run at its first unrecorded step."""
    from copal.sweep import check_runs, plan_runs, requested_resources
    from flows.runners import parse_runner

    setup_logging(verbose)
    where = parse_runner(runner)
    resources = requested_resources(cpus, memory_gb, gpus)
    planned, several = plan_runs(configs or [None], sweep, set_, out)
    api = None if where.cluster else TemporaryApi()
    if not several and not where.cluster:
        _run_one(planned[0], resources, tracking_uri, api)
        return
    from flows import runs

    data_dir = None
    if where.cluster:
        planned, data_dir, tracking_uri = runs.for_workers(planned, tracking_uri)
    check_runs(planned, several, data_dir)
    with progress_bar() as report:
        failures = runs.run_all(planned, where, resources, tracking_uri, data_dir, api, report)
    print_runs([run for run in planned if run.name not in failures])
    if failures:
        fail(runs.failure_message(failures, len(planned)),
             2 if all(isinstance(error, InputError) for error in failures.values()) else 1)


def _run_one(planned, resources, tracking_uri: str | None, api: TemporaryApi) -> None:
    """One run in this process: its PPL matrix, BWT and average PPL."""
    from copal.continual import preflight
    from copal.model import torch_threads

    preflight(planned.config, planned.directory)
    from flows.continual import continual_flow

    api.ready()
    with progress_bar() as report, torch_threads(resources.cpus):
        metrics = continual_flow(planned.config, planned.directory, tracking_uri, progress=report)
    print_summary(metrics)
    note(f"run directory: {planned.directory}")
    for line in next_steps(planned.directory):
        note(line)


def print_runs(finished) -> None:
    """One row per finished run: average PPL, BWT, run directory."""
    fmt = lambda value: "-" if value is None else f"{value:.2f}"  # noqa: E731
    table = Table(title="runs")
    table.add_column("run", no_wrap=True)
    table.add_column("avg PPL", justify="right")
    table.add_column("BWT", justify="right")
    table.add_column("run directory", overflow="fold")
    for run in finished:
        metrics = RunMetrics.model_validate(json.loads((run.directory / "metrics.json").read_text()))
        table.add_row(run.name, fmt(metrics.avg_ppl), fmt(metrics.bwt), str(run.directory))
    Console(width=max(Console().width, 150)).print(table)


@command
def step(
    data: Annotated[str, typer.Argument(
        metavar="DATA", help="The new domain's data source, e.g. text:PATH or builtin:code.")],
    run: Annotated[Path, typer.Option(metavar="RUN_DIR", help="Run directory of an existing run.")],
    tracking_uri: TrackingUri = None,
    trust_remote_code: TrustRemoteCode = False,
):
    """One more continual step on a new domain, continuing from HEAD.

    This is what a scheduled job calls."""
    from copal.continual import preflight
    from copal.rundir import RunDir, summarize
    from copal.rundir import check_trust

    setup_logging(False)
    directory = RunDir(run).require()
    config = directory.read_config()[0]
    check_trust(directory, config, trust_remote_code)
    api = TemporaryApi()
    preflight(config, run, (data,))
    from flows.continual import step_flow

    api.ready()
    with progress_bar() as report:
        step_flow(data, run, tracking_uri, progress=report)
    directory = RunDir(run)
    print_summary(summarize(directory, directory.read_config()[0]))
    for line in next_steps(run):
        note(line)


@command
def replay(
    run: Annotated[Path, typer.Option(metavar="RUN_DIR", help="Run directory.")],
    step: Annotated[int, typer.Option(metavar="K", help="Step id to recompute.")],
    trust_remote_code: TrustRemoteCode = False,
):
    """Recompute a step from its parent and data and check it against the record.

    The replay runs with the step's recorded thread count and tokenization. Exit 0 if the
    masks, state and weights are bit-identical, or, on a machine whose environment differs in a way that
    cannot be pinned (torch, BLAS, CPU kernels, device), if every layer's mask and the
    step's PPL agree with the record within the stated tolerance; 1 otherwise; 2 if the recorded files fail
    their digests. Changes nothing on disk."""
    from copal.continual import ContinualRun
    from copal.rundir import RunDir
    from copal.rundir import check_trust

    setup_logging(False)
    directory = RunDir(run).require()
    config, _ = directory.read_config()
    check_trust(directory, config, trust_remote_code)
    state = directory.step(step)
    for checked in (state, directory.step(state.record.parent) if state.record.parent else None):
        if checked is not None:  # what replay reads: the step and the state it continued from
            checked.verify()
    with progress_bar() as report:
        result = ContinualRun(config, run, progress=report, readonly=True).replay(step)
    head, *evidence = result.lines()
    if not result.verified:
        note(f"copal: {head}")
        for line in evidence:
            note(line)
        raise typer.Exit(1)
    print(head)
    for line in evidence:
        print(line)


@command
def serve(
    run: Annotated[Path, typer.Option(metavar="RUN_DIR", help="Run directory the schedule adds steps to.")],
    cron: Annotated[str, typer.Option(metavar="CRON", help="Cron schedule, e.g. '0 3 * * 1' (Mondays 03:00).")],
    queue: Annotated[Optional[Path], typer.Option(
        metavar="DIR", help="Folder of new domains (*.txt, *.jsonl, *.parquet, "
                            "folders), taken in name order.")] = None,
    name: Annotated[Optional[str], typer.Option(
        metavar="NAME", help="Deployment name. Default: the run's name.")] = None,
    tracking_uri: TrackingUri = None,
    trust_remote_code: TrustRemoteCode = False,
):
    """Serve a Prefect deployment that adds one step per cron tick.

    Each tick takes the next domain of the queue (then the config's pending
    domains). Needs a Prefect server: `prefect server start`, and
    PREFECT_API_URL pointing at it."""
    from copal.rundir import RunDir

    setup_logging(False)
    from copal.rundir import check_trust

    directory = RunDir(run).require()
    config, _ = directory.read_config()
    check_trust(directory, config, trust_remote_code)
    if queue is not None and not queue.is_dir():
        raise InputError(f"{queue}: queue folder not found")
    from flows.continual import scheduled_step_flow

    scheduled_step_flow.serve(name=name or config.name, cron=cron,
                              parameters={"run_dir": str(run.resolve()),
                                          "queue": str(queue.resolve()) if queue else None,
                                          "tracking_uri": tracking_uri})

