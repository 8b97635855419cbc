"""Many runs from one command: several configs and/or `--sweep` values (`copal run`).

The runs are the product configs × sweep values; `--set` applies to each. A run is
named after its config's `name` plus, per swept key in the order of the --sweep
options, `-KEY-VALUE` (as typed; characters other than letters, digits, `.`, `_` and
`-` become `_`): `demo-sparsity-0.6`, `demo-sparsity-0.6-method-wanda`. That name is
also the run's `name` (its MLflow parent run, and its registered model's prefix), and its directory
is `OUT/<name>` (OUT: --out, default runs).
Every run is planned and checked here before any runs; flows/runs.py runs them.
"""

import itertools
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from copal.config import DEMO_CONFIG, RunConfig, build_config, load_run_raw
from copal.errors import InputError
from copal.grid import Resources
from copal.names import check_name
from copal.paths import state_home


@dataclass(frozen=True)
class PlannedRun:
    name: str
    config: RunConfig
    directory: Path


def parse_sweep(item: str) -> tuple[str, list[str]]:
    """`KEY=V1,V2,...` → (KEY, [V1, V2, ...]); values are parsed as YAML later, like --set's."""
    key, separator, values = item.partition("=")
    parts = values.split(",")
    if not separator or not key or not all(parts):
        raise InputError(f"--sweep {item!r}: expected KEY=V1,V2,... (no empty value)")
    return key, parts


def parse_sweeps(items: list[str], overrides: list[str]) -> list[tuple[str, list[str]]]:
    """The --sweep options; a key swept twice, or both swept and --set, is an error."""
    sweeps = [parse_sweep(item) for item in items]
    keys = [key for key, _ in sweeps]
    fixed = {item.partition("=")[0] for item in overrides}
    for key in keys:
        if keys.count(key) > 1:
            raise InputError(f"--sweep {key}: swept twice; give its values in one --sweep")
        if key in fixed:
            raise InputError(f"--sweep {key}: also given with --set; sweep it or set it, not both")
    return sweeps


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def run_name(base: str, swept: tuple[tuple[str, str], ...]) -> str:
    """The config's name plus `-KEY-VALUE` per swept key."""
    return base + "".join(f"-{_slug(key)}-{_slug(value)}" for key, value in swept)


@contextmanager
def about(name: str | None):
    """InputErrors raised inside name the run (None: left as they are, for a single run)."""
    try:
        yield
    except InputError as error:
        if name is None:
            raise
        raise InputError(f"run {name}: {error}") from None


def _plan_one(path: Path | None, swept: tuple, overrides: list[str], parent: Path | None,
              several: bool) -> PlannedRun:
    raw = load_run_raw(path, [*overrides, *(f"{key}={value}" for key, value in swept)])  # errors name the file
    name = run_name(str(raw.get("name", RunConfig.model_fields["name"].default)), swept)
    with about(name if several else None):
        config = build_config(raw, str(path or DEMO_CONFIG)).model_copy(update={"name": check_name(name, "run name")})
    default = state_home() / "runs"
    directory = (parent or default) / name if several else parent or default / name
    return PlannedRun(name, config, directory)


def plan_runs(paths: list[Path | None], sweep_items: list[str], overrides: list[str],
              out: Path | None) -> tuple[list[PlannedRun], bool]:
    """Every run of the product paths × sweep values, each config loaded and validated,
    and whether there are several (then `out` is the folder of their directories, else
    the one run's directory)."""
    sweeps = parse_sweeps(sweep_items, overrides)
    several = len(paths) > 1 or bool(sweeps)
    combinations = list(itertools.product(*[[(key, value) for value in values] for key, values in sweeps]))
    planned = [_plan_one(path, swept, overrides, out, several) for path in paths for swept in combinations]
    names = [run.name for run in planned]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise InputError(f"runs named {', '.join(twice)} more than once (each run's directory is "
                         f"{out or state_home() / 'runs'}/<name>): give the configs different names")
    return planned, several


def check_runs(planned: list[PlannedRun], several: bool, data_dir: Path | None = None) -> None:
    """Every run's inputs (directory, model, data), before any runs."""
    from copal.continual import preflight

    for run in planned:
        with about(run.name if several else None):
            preflight(run.config, run.directory, data_dir=data_dir)


def requested_resources(cpus: int | None, memory_gb: float | None, gpus: float) -> Resources:
    """What each run reserves, from --cpus/--memory-gb/--gpus; a bad value is one line."""
    try:
        return Resources(cpus=cpus, memory_gb=memory_gb, gpus=gpus)
    except ValidationError as error:
        first = error.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-")
        raise InputError(f"{option} {first['input']}: {first['msg'].lower()}") from None
