"""The `copal` command line (Typer), a module per command group:

    cli/run.py       run, step, serve, replay: commands that compute steps
    cli/history.py   history, rollback, verify, export, report: a run's recorded history
    cli/models.py    eval, ingest, import-gguf: models and data outside a run
    cli/bench.py     bench: the benchmark grid

cli/app.py holds the Typer app, the error-to-exit-code decorator and the shared
options; cli/logs.py the log setup; cli/console.py the progress display. Every
command has --help.
"""

# Each module registers its commands on `app`; `copal --help` lists them in this order.
from cli import run, history, models, bench  # noqa: F401
from cli.app import app


def main() -> None:
    """The `copal` entry point."""
    from copal.allocator import limit_allocator_fragmentation
    from flows.api import prefect_settings

    limit_allocator_fragmentation()
    prefect_settings()
    app(prog_name="copal")
