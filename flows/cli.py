"""The `copal` command line (Typer). Every command has --help.

Exit codes: 0 success, 2 bad input or configuration (one line on stderr, no
traceback), 1 anything else.
"""

import json
import logging
import sys
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from copal.errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Continual pruning of causal language models (COPAL and its baselines).")
err = Console(stderr=True)


def _fail(message: str) -> None:
    err.print(f"copal: error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def command(function):
    """Register a command whose InputErrors become exit code 2 with one line."""

    @wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except InputError as error:
            _fail(str(error))

    return app.command()(wrapper)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)], force=True)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


@contextmanager
def progress_bar():
    """A Rich progress display and the callback the library reports to."""
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal) as bars:
        tasks = {}

        def report(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bars.add_task(what, total=total)
            bars.update(tasks[what], completed=done, total=total)
            if done >= total:
                bars.remove_task(tasks.pop(what))

        yield report


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


@command
def run(
    config: Annotated[Optional[Path], typer.Argument(help="Run config (YAML). Default: the offline demo config.")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="Override a config key: key=value or a.b=value.")] = [],
    out: Annotated[Optional[Path], typer.Option(help="Run directory. Default: runs/<name>.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
):
    """A continual run over the config's domain sequence (resumes an interrupted run)."""
    from copal.config import load_config
    from copal.continual import ContinualRun

    _setup_logging(verbose)
    cfg = load_config(config, set_)
    root = out or Path("runs") / cfg.name
    with progress_bar() as report:
        metrics = ContinualRun(cfg, root, progress=report).run()
    print_summary(metrics)
    err.print(f"run directory: {root}")


@command
def eval(  # noqa: A001 - the command is called eval
    model: Annotated[Path, typer.Option(help="A Hugging Face model directory (or hub id).")],
    data: Annotated[str, typer.Option(help="Data source, e.g. builtin:docs, text:PATH, jsonl:PATH[:FIELD].")],
    seqlen: Annotated[int, typer.Option(help="Tokens per evaluation window.")] = 256,
    max_tokens: Annotated[int, typer.Option(help="Evaluate on at most this many tokens.")] = 65536,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
):
    """Perplexity of a model on a data source's evaluation part; prints JSON {"ppl", "tokens"}."""
    from copal.data import evaluation_windows, ingest
    from copal.metrics import perplexity
    from copal.model import load_model, resolve_device

    _setup_logging(False)
    if seqlen < 2 or max_tokens < seqlen:
        raise InputError(f"--seqlen {seqlen} / --max-tokens {max_tokens}: need 2 <= seqlen <= max-tokens")
    domain = ingest(data)
    loaded, tokenizer = load_model(str(model))
    ppl, tokens = perplexity(loaded, evaluation_windows(domain, tokenizer, seqlen, max_tokens),
                             resolve_device(device))
    print(json.dumps({"ppl": ppl, "tokens": tokens}))


@command
def ingest(
    data: Annotated[list[str], typer.Argument(help="Data sources, e.g. builtin:docs text:PATH jsonl:PATH[:FIELD].")],
    data_dir: Annotated[Optional[Path], typer.Option(help="Arrow cache folder. Default: data/arrow "
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
    run: Annotated[Path, typer.Option(help="Run directory.")],
    step: Annotated[int, typer.Option(help="Step id to export.")],
    out: Annotated[Path, typer.Option(help="Output model directory (must not exist or be empty).")],
):
    """The model after a step as a plain Hugging Face directory (safetensors)."""
    from copal.export import export_step

    _setup_logging(False)
    export_step(run, step, out)
    err.print(f"wrote {out}")


def main() -> None:
    app(prog_name="copal")


if __name__ == "__main__":
    sys.exit(main())
