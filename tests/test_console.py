"""The command line explains itself: help fast and readable, every option in the
README's table, a line per stage and a heartbeat without a terminal, and what to run
next after a run."""

import io
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console

from cli import app
from cli.console import next_steps, progress_bar

ROOT = Path(__file__).resolve().parent.parent


def test_help_answers_fast_without_importing_torch():
    probe = ("import sys, time; start = time.perf_counter(); sys.argv = ['copal', 'run', '--help']\n"
             "from cli import main\ntry:\n    main()\nexcept SystemExit:\n    pass\n"
             "print('SECONDS', time.perf_counter() - start, 'torch' in sys.modules, 'transformers' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    seconds, torch, transformers = done.stdout.split("SECONDS")[1].split()
    assert (torch, transformers) == ("False", "False")
    assert float(seconds) < 2.0, seconds
    text = done.stdout
    assert "Usage: copal run [OPTIONS] [CONFIG]..." in text
    assert "<list" not in text and "<bool>" not in text and "<str>" not in text and "[[" not in text
    assert "--out DIR" in text and "--cpus N" in text and "-v, --verbose" in text and "Debug lines" in text


def _table_rows() -> dict[str, str]:
    """README's command table: command name → the text of its rows."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Commands"):readme.index("### Configuration")]
    rows: dict[str, str] = {}
    for row in re.findall(r"^\| `copal ([a-z-]+)(.*)$", table, re.M):
        rows[row[0]] = rows.get(row[0], "") + row[1]
    return rows


def test_every_option_of_every_command_is_in_the_readme_table():
    import typer.main

    group = typer.main.get_command(app)
    rows = _table_rows()
    for name, command in group.commands.items():
        assert name in rows, f"copal {name} is not in README's table"
        for param in command.params:
            options = [option for option in param.opts if option.startswith("-")]
            if options:  # an option, in either of its forms
                assert any(re.search(rf"(^|[\s\[`]){re.escape(option)}\b", rows[name]) for option in options), \
                    (name, options)


def test_without_a_terminal_a_line_per_stage_and_a_heartbeat():
    output = io.StringIO()
    console = Console(file=output, force_terminal=False, width=200)
    with progress_bar(console, heartbeat_s=1.5) as report:
        report("evaluate dense", 0, 2)
        report("evaluate dense", 1, 2)
        time.sleep(2.8)  # a long window: heartbeats say what is going on
        report("evaluate dense", 2, 2)
    lines = output.getvalue().splitlines()
    assert any(line.startswith("working (") and "evaluate dense 1/2" in line for line in lines), lines
    assert lines[-1].startswith("evaluate dense: 2/2 done in"), lines
    assert len([line for line in lines if "done in" in line]) == 1


def test_after_a_run_the_next_commands_and_the_uis(tmp_path, monkeypatch):
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    (run / "HEAD").write_text("3\n")
    (run / "tracking.json").write_text(json.dumps({"tracking_uri": "sqlite:////data/mlflow.db",
                                                   "experiment_id": "7"}))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    text = "\n".join(next_steps(run))
    for expected in (f"copal history --run {run}", f"copal report --run {run}", f"copal replay --run {run} --step 3",
                     "mlflow ui --backend-store-uri sqlite:////data/mlflow.db",
                     "http://127.0.0.1:5000/#/experiments/7/runs", "prefect server start",
                     "http://127.0.0.1:4200/runs"):
        assert expected in text, expected
