"""What the command line shows while it works, and after.

In a terminal: Rich progress bars on stderr, with copal's log lines printed above
them through the same console (Prefect's own console lines are off unless
--verbose: `quiet_prefect`). Without a terminal (a log file, CI): one line per
finished stage, and a heartbeat line at least every `HEARTBEAT_S` seconds while
work goes on, so a redirected run never looks hung.
"""

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

err = Console(stderr=True)
HEARTBEAT_S = 25.0


def quiet_prefect(verbose: bool) -> None:
    """Prefect's console handler shows warnings and errors only, unless `verbose`: its
    INFO lines (flow and task runs starting and finishing) would break the progress
    display. They still go to the Prefect API (its UI). Applies when Prefect is imported
    after this (the command line's case)."""
    if verbose:  # asked for on this command line: wins over an inherited setting
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "DEBUG"
    else:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


class _Lines:
    """Progress as plain lines: a stage's line when it finishes, a heartbeat while waiting."""

    def __init__(self, console: Console, heartbeat_s: float):
        self.console = console
        self.heartbeat_s = heartbeat_s
        self.started = self.last = time.monotonic()
        self.stages: dict[str, list] = {}  # what → [started, done, total]
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="copal-heartbeat", daemon=True)
        self.thread.start()

    def _say(self, line: str) -> None:
        self.last = time.monotonic()
        self.console.print(line, markup=False, highlight=False, soft_wrap=True)
        self.console.file.flush()

    def report(self, what: str, done: int, total: int) -> None:
        with self.lock:
            now = time.monotonic()
            stage = self.stages.setdefault(what, [now, done, total])
            stage[1:] = [done, total]
            if done >= total:
                del self.stages[what]
                self._say(f"{what}: {done}/{total} done in {_duration(now - stage[0])}")

    def _beat(self) -> None:
        while not self.stopped.wait(1.0):
            with self.lock:
                if time.monotonic() - self.last < self.heartbeat_s:
                    continue
                doing = "; ".join(f"{what} {done}/{total}" for what, (_, done, total) in self.stages.items())
                self._say(f"working ({_duration(time.monotonic() - self.started)}): {doing or 'between stages'}")

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()


@contextmanager
def progress_bar(console: Console = err, heartbeat_s: float | None = None):
    """The callback the library reports progress to (`what`, `done`, `total`): Rich bars
    in a terminal, lines otherwise."""
    if not console.is_terminal:
        lines = _Lines(console, heartbeat_s or HEARTBEAT_S)
        try:
            yield lines.report
        finally:
            lines.close()
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bars:
        tasks = {}

        def report(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bars.add_task(what, total=total)
            bars.update(tasks[what], completed=done, total=total)
            if done >= total:
                bars.remove_task(tasks.pop(what))

        yield report


def next_steps(run_dir: Path) -> list[str]:
    """What a user runs after a run: its audit table, report and a replay of its last
    step, and how to open the MLflow and Prefect UIs on what it recorded."""
    head = (run_dir / "HEAD").read_text().strip() if (run_dir / "HEAD").is_file() else "1"
    lines = ["next:",
             f"  copal history --run {run_dir}            the audit table of every step",
             f"  copal report --run {run_dir}             an HTML report ({run_dir}/report.html)",
             f"  copal replay --run {run_dir} --step {head}    recompute the last step and check its masks"]
    tracking = run_dir / "tracking.json"
    if tracking.is_file():
        recorded = json.loads(tracking.read_text())
        uri = recorded.get("tracking_uri", "")
        experiment = recorded.get("experiment_id")
        if uri.startswith(("sqlite:", "file:", "/")):
            lines.append(f"  mlflow ui --backend-store-uri {uri}    MLflow, then open "
                         f"http://127.0.0.1:5000/#/experiments/{experiment}/runs")
        elif uri:
            lines.append(f"  MLflow: {uri.rstrip('/')}/#/experiments/{experiment}/runs")
    api = os.environ.get("PREFECT_API_URL")
    if api:
        lines.append(f"  Prefect: {api.removesuffix('/api').rstrip('/')}/runs")
    else:
        lines.append("  prefect server start    Prefect's UI on the flow runs, then open http://127.0.0.1:4200/runs")
    return lines
