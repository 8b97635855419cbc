"""The `copal` command line (Typer). Every command has --help.

Exit codes: 0 success, 2 bad input or configuration (one line on stderr, no
traceback), 1 anything else.
"""

import json
import logging
import os
import sys
from functools import wraps
from pathlib import Path
from typing import Annotated, Optional

import typer
import typer.core
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from copal.errors import EnvironmentFault, InputError, as_fault
from flows.api import TemporaryApi
from flows.console import err, next_steps, progress_bar, quiet_prefect

# Plain help (click's formatter): paragraphs rewrapped to the terminal, an option's
# metavar (DIR, N, URI) instead of its Python type. Only heavy-free modules are imported
# above, so `copal --help` and an input error answer in about a second.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="Continual pruning of causal language models (COPAL and its baselines), "
                       "every step recorded so it can be audited, replayed and rolled back.")
# An argument is named by its metavar (CONFIG, DATA, GGUF); typer would add its Python type.
typer.core.TyperArgument.display_type_rich = lambda self, ctx: None


def _fail(message: str, code: int = 2) -> None:
    err.print(f"copal: error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def command(function):
    """Register a command whose InputErrors become exit code 2 with one line, and whose
    environment faults (EnvironmentFault, a full disk) exit code 1 with one line."""

    @wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except InputError as error:
            _fail(str(error))
        except EnvironmentFault as error:
            _fail(str(error), 1)
        except OSError as error:
            fault = as_fault(error)
            if fault is None:
                raise
            _fail(str(fault), 1)

    # The command list shows each command's first paragraph whole (click would cut it at 45 characters).
    summary = " ".join((function.__doc__ or "").split("\n\n")[0].split())
    return app.command(short_help=summary)(wrapper)


def _one_line(error: BaseException | None) -> bool:
    """Whether the command reports `error` itself, as one line."""
    return isinstance(error, (InputError, EnvironmentFault)) or (error is not None and as_fault(error) is not None)


class _WithoutInputErrors(logging.Filter):
    """Drops Prefect's reports of an error the command reports as one line (InputError,
    EnvironmentFault, a full disk), wherever it was raised: the failed task's and flow
    run's traceback, and the 'Finished in state Failed(... InputError: …)' lines that
    quote it."""

    _QUOTED = (f"{InputError.__name__}: ", f"{EnvironmentFault.__name__}: ", "[Errno 28]", "[Errno 122]")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and _one_line(record.exc_info[1]):
            return False
        message = record.getMessage()
        return not any(quoted in message for quoted in self._QUOTED)


# The loggers Prefect's engines report flow and task runs on (and the one its engine crashes go to).
_PREFECT_RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs", "prefect.engine")
_without_input_errors = _WithoutInputErrors()


def _setup_logging(verbose: bool) -> None:
    """copal's own messages go to stderr through Rich; Prefect keeps its own handler
    (its lines name the task run) but not for input errors; library chatter and
    download bars are silenced."""
    for name in _PREFECT_RUN_LOGGERS:
        logging.getLogger(name).addFilter(_without_input_errors)
    logger = logging.getLogger("copal")
    logger.handlers = [RichHandler(console=err, show_path=False, show_time=False)]
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers", "mlflow", "alembic", "lm_eval"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry warnings, one per attempt
    quiet_prefect(verbose)
    # Hugging Face's download and loading bars off, without importing transformers here.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if "transformers" in sys.modules:  # imported already (a test's process): tell it directly
        sys.modules["transformers"].utils.logging.disable_progress_bar()
        sys.modules["transformers"].utils.logging.set_verbosity_error()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def print_summary(metrics: dict) -> None:
    """The PPL matrix (dense row first), BWT and average PPL."""
    table = Table(title=f"{metrics['method']}/{metrics['regime']}, {metrics['structure']}, "
                        f"sparsity {metrics['sparsity']:g}: perplexity after each step")
    table.add_column("after")
    for name in metrics["domains"]:
        table.add_column(name, justify="right")
    table.add_column("s", justify="right")
    table.add_column("peak MB", justify="right")
    fmt = lambda value: "-" if value is None else f"{value:.2f}"  # noqa: E731
    table.add_row("dense", *[fmt(v) for v in metrics["dense_ppl"]], "", "")
    for row, step in zip(metrics["ppl"], metrics["steps"]):
        table.add_row(f"{step['step']}: {step['domain']}", *[fmt(v) for v in row],
                      f"{step['seconds']:.1f}", f"{step['peak_rss_mb']:.0f}")
    console = Console()
    console.print(table)
    console.print(f"BWT {fmt(metrics['bwt'])}   average PPL {fmt(metrics['avg_ppl'])}")


TrackingUri = Annotated[Optional[str], typer.Option(
    metavar="URI", help="MLflow tracking URI. Default: $MLFLOW_TRACKING_URI, else sqlite:///…/mlflow.db in "
                        "$COPAL_HOME or the working directory.")]


TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="Allow running the model's own code "
                                                                          "when the run's config.yaml asks for it "
                                                                          "(trust_remote_code: true).")]


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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug lines, and Prefect's own log lines "
                                                                  "(flow and task runs), on stderr.")] = False,
):
    """A continual run over the config's domains (Prefect flow, MLflow, DVC); or several.

    Several configs and/or --sweep: one run per config × sweep value, each checked before
    any runs, as one Prefect flow of runs on --runner. Rerunning the same command resumes
    each run at its first unrecorded step."""
    from copal.sweep import check_runs, plan_runs, requested_resources
    from flows.runners import parse_runner

    _setup_logging(verbose)
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
        _fail(runs.failure_message(failures, len(planned)),
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
    err.print(f"run directory: {planned.directory}", markup=False, highlight=False, soft_wrap=True)
    for line in next_steps(planned.directory):
        err.print(line, markup=False, highlight=False, soft_wrap=True)


def print_runs(finished) -> None:
    """One row per finished run: average PPL, BWT, run directory."""
    fmt = lambda value: "-" if value is None else f"{value:.2f}"  # noqa: E731
    table = Table(title="runs")
    table.add_column("run", no_wrap=True)
    table.add_column("avg PPL", justify="right")
    table.add_column("BWT", justify="right")
    table.add_column("run directory", overflow="fold")
    for run in finished:
        metrics = json.loads((run.directory / "metrics.json").read_text())
        table.add_row(run.name, fmt(metrics["avg_ppl"]), fmt(metrics["bwt"]), str(run.directory))
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
    from copal.continual import RunDir, preflight, summarize
    from copal.rundir import check_trust

    _setup_logging(False)
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
        err.print(line, markup=False, highlight=False, soft_wrap=True)


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
    from copal.continual import ContinualRun, RunDir
    from copal.rundir import check_trust

    _setup_logging(False)
    directory = RunDir(run).require()
    config, _ = directory.read_config()
    check_trust(directory, config, trust_remote_code)
    state = directory.step(step)
    for checked in (state, directory.step(state.record["parent"]) if state.record["parent"] else None):
        if checked is not None:  # what replay reads: the step and the state it continued from
            checked.verify()
    with progress_bar() as report:
        result = ContinualRun(config, run, progress=report, readonly=True).replay(step)
    head, *evidence = result.lines()
    if not result.verified:
        err.print(f"copal: {head}", markup=False, highlight=False, soft_wrap=True)
        for line in evidence:
            err.print(line, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    print(head)
    for line in evidence:
        print(line)


@command
def rollback(
    run: Annotated[Path, typer.Option(metavar="RUN_DIR", help="Run directory.")],
    step: Annotated[int, typer.Option(metavar="K", help="Step id to make HEAD again.")],
):
    """Make an earlier step the head of the run again.

    Later steps stay in the history; the next step continues from this one."""
    from copal.continual import RunDir, summarize
    from copal.state import write_json

    _setup_logging(False)
    directory = RunDir(run).require()
    config, _ = directory.read_config()
    directory.step(step)
    with directory.lock():
        for state in directory.lineage(step):
            state.verify()
        previous = directory.head()
        directory.set_head(step)
        write_json(directory.metrics_path, summarize(directory, config))
    err.print(f"HEAD: step {previous} → step {step}")


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

    _setup_logging(False)
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
        print(json.dumps(rows, indent=1))
        return
    table = Table(title=f"history of {run} (* = in HEAD's lineage)")
    for column in ("step", "parent", "domain", "data", "method", "sparsity", "PPL own", "avg PPL",
                   "BWT", "MLflow run", "DVC rev"):
        table.add_column(column, no_wrap=True)
    fmt = lambda value: "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)  # noqa: E731
    for row in rows:
        table.add_row(f"{row['step']}{' *' if row['in_head_lineage'] else ''}{' HEAD' if row['head'] else ''}",
                      str(row["parent"]), row["domain"], row["fingerprint"][:8],
                      f"{row['method']}/{row['regime']} {row['structure']}", fmt(row["sparsity"]),
                      fmt(row["ppl_own"]), fmt(row["avg_ppl"]), fmt(row["bwt"]),
                      (row["mlflow_run_id"] or "-")[:8], (row["dvc_revision"] or "-")[:8])
    Console(width=max(Console().width, 150)).print(table)


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
    from copal.continual import RunDir

    _setup_logging(False)
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


@command
def eval(  # noqa: A001 - the command is called eval
    model: Annotated[Path, typer.Option(metavar="MODEL_DIR", help="A Hugging Face model directory (or hub id).")],
    data: Annotated[Optional[str], typer.Option(
        metavar="DATA", help="Data source for perplexity, e.g. builtin:docs, text:PATH, "
                             "jsonl:PATH[:FIELD].")] = None,
    tasks: Annotated[Optional[str], typer.Option(
        metavar="NAME[,NAME…]", help="lm-eval tasks for accuracy, NAME[,NAME…]: copal's "
                                     "(copal_wordnet_define, copal_fortune_ending), the include "
                                     "path's, or lm-eval's own (online).")] = None,
    include_path: Annotated[Optional[Path], typer.Option(metavar="DIR", help="A folder of lm-eval task YAMLs.")] = None,
    task_limit: Annotated[Optional[int], typer.Option(
        metavar="N", help="At most this many items per task (the first).")] = None,
    seqlen: Annotated[int, typer.Option(metavar="N", help="Tokens per evaluation window.")] = 256,
    max_tokens: Annotated[int, typer.Option(metavar="N", help="Evaluate on at most this many tokens.")] = 65536,
    device: Annotated[str, typer.Option(metavar="DEVICE", help="auto, cpu, cuda or cuda:N.")] = "auto",
):
    """Perplexity on a data source's evaluation part and/or accuracy on lm-eval tasks; prints one JSON object.

    --data: {"ppl", "tokens"}; --tasks: {"tasks": {NAME: {METRIC: value}}, "task_items": {NAME: {"items",
    "sha256"}}}; both: both in one object."""
    from copal.data import ingest
    from copal.metrics import perplexity
    from copal.model import load_model, resolve_device
    from copal.windows import evaluation_windows

    _setup_logging(False)
    if include_path is not None and tasks is None:
        raise InputError(f"--include-path {include_path}: only used with --tasks")
    if data is None and tasks is None:
        raise InputError("give --data (perplexity), --tasks (task accuracy) or both")
    if task_limit is not None and task_limit < 1:
        raise InputError(f"--task-limit {task_limit}: must be at least 1")
    if data is not None:
        if seqlen < 2 or max_tokens < seqlen:
            raise InputError(f"--seqlen {seqlen} / --max-tokens {max_tokens}: need 2 <= seqlen <= max-tokens")
        domain = ingest(data)
    names = None
    if tasks is not None:
        from copal.lm_eval_tasks import check_tasks, evaluate_tasks, parse_task_list

        names = parse_task_list(tasks)
        check_tasks(names, include_path)
    loaded, tokenizer = load_model(str(model))
    result = {}
    if data is not None:
        ppl, tokens = perplexity(loaded, evaluation_windows(domain, tokenizer, seqlen, max_tokens),
                                 resolve_device(device))
        result |= {"ppl": ppl, "tokens": tokens}
    if names is not None:
        result |= evaluate_tasks(loaded, tokenizer, names, include_path, resolve_device(device), limit=task_limit)
    print(json.dumps(result))


@command
def ingest(
    data: Annotated[list[str], typer.Argument(
        metavar="DATA", help="Data sources, e.g. builtin:docs text:PATH jsonl:PATH[:FIELD].")],
    data_dir: Annotated[Optional[Path], typer.Option(metavar="DIR", help="Arrow cache folder. Default: data/arrow "
                                                          "(or $COPAL_DATA_DIR).")] = None,
):
    """Ingest data sources into Arrow (train/calibration/evaluation splits); prints JSON per source."""
    from copal.data import ingest as ingest_source

    _setup_logging(False)
    for spec in data:
        domain = ingest_source(spec, data_dir)
        print(json.dumps({"name": domain.name, "source": spec, "fingerprint": domain.fingerprint,
                          "path": str(domain.path), "documents": domain.counts}))


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

    _setup_logging(False)
    export_step(run, step, out, trust_remote_code)
    err.print(f"wrote {out}")


@command
def verify(
    run: Annotated[Path, typer.Option(help="Run directory.")],
):
    """Check a whole run: every step's files against the SHA-256 its step.json records,
    HEAD, the lineages and the run's records. Exit 0 if all hold, 2 naming the first fault."""
    from copal.verify import verify_run

    _setup_logging(False)
    checked = verify_run(run)
    print(f"{run}: {checked['steps']} step(s) verified"
          + (f", {checked['undigested']} recorded without digests (readable, not checked)"
             if checked["undigested"] else "") + f"; HEAD is step {checked['head']}")


@command
def import_gguf(
    gguf: Annotated[Path, typer.Argument(metavar="GGUF", help="A GGUF file of a causal LM that transformers "
                                                               "can read (any quantisation).")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT_DIR", help="Output model directory (must not exist "
                                                                    "or be empty).")],
    dtype: Annotated[str, typer.Option(
        metavar="DTYPE", help="float32 or bfloat16: what the weights are un-quantised to.")] = "float32",
):
    """A GGUF model as a plain Hugging Face directory (float safetensors, tokenizer, chat template).

    Also writes gguf_source.json: the GGUF's file name and SHA-256."""
    from copal.gguf import import_gguf as convert

    _setup_logging(False)
    done = convert(gguf, out_dir, dtype)
    err.print(f"wrote {out_dir}: {'/'.join(done['architectures'] or [done['architecture']])}, "
              f"{done['parameters'] / 1e6:.1f} M parameters in {done['dtype']}, "
              f"{done['bytes_written'] / 1e6:.0f} MB, from {done['file']} (sha256 {done['sha256'][:12]}…) "
              f"in {done['seconds']:.0f} s", markup=False, highlight=False, soft_wrap=True)


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

    _setup_logging(False)
    err.print(f"wrote {write_report(run, out)}")


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
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug lines, and Prefect's own log lines "
                                                                  "(flow and task runs), on stderr.")] = False,
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
    _setup_logging(verbose)
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
    if summary["dense"]:
        table.add_row("dense", fmt(summary["dense"]["avg_ppl"]), "-", "-", "-")
    for cell in summary["cells"]:
        steps = cell["steps"]
        table.add_row(cell["id"], fmt(cell["avg_ppl"]), fmt(cell["bwt"]),
                      f"{sum(s['seconds'] for s in steps) / len(steps):.1f}",
                      f"{max(s['peak_rss_mb'] for s in steps):.0f}")
    Console().print(table)
    err.print(f"wrote {', '.join(str(path) for path in written[:2])} and {len(written) - 2} plot(s)")


def main() -> None:
    from copal.allocator import limit_allocator_fragmentation
    from flows.api import prefect_settings

    limit_allocator_fragmentation()
    prefect_settings()
    app(prog_name="copal")


if __name__ == "__main__":
    sys.exit(main())
