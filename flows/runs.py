"""`copal run` over several runs (planned and checked in copal/sweep.py) on one runner.

The runs are one Prefect flow (`copal-runs`), each run a task that calls `continual_flow`
(a nested flow run: its own MLflow parent run, DVC snapshots and resume, as a single
`copal run`). Tasks go where flows/runners.py sends them: locally one at a time in this
process; on a Ray/Dask cluster at once, as their resources allow. A failed run does
not stop the others: `run_all` returns the failures.
"""

import logging
import os
from pathlib import Path

import torch

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from copal.config import RunConfig
from copal.errors import InputError
from copal.grid import Resources
from copal.model import torch_threads
from copal.progress import Progress
from copal.sweep import PlannedRun
from flows.runners import Runner, attached, parse_runner, submit, task_runner

log = logging.getLogger("copal")


def for_workers(planned: list[PlannedRun], uri: str | None) -> tuple[list[PlannedRun], Path, str]:
    """What a cluster's workers are given, resolved here (they have neither this process's
    working directory nor its environment): the runs with absolute directories, the Arrow
    cache ($COPAL_DATA_DIR, else data/arrow under $COPAL_HOME or here) and the MLflow tracking URI."""
    from copal.data import arrow_dir
    from tasks.tracking import tracking_uri

    return ([PlannedRun(run.name, run.config, run.directory.resolve()) for run in planned], arrow_dir().resolve(),
            tracking_uri(uri))


# Ray Client pickles the task's function by value, with the globals it uses: it only
# calls module functions. What only the local runner has (the progress display) comes as
# an argument, None on a cluster.
@task(name="run", cache_policy=NO_CACHE, persist_result=False)
def run_task(config: RunConfig, run_dir: str, tracking_uri: str | None, data_dir: str | None, threads: int | None,
             workdir: str | None = None, progress: Progress | None = None) -> str:
    """One continual run (resumed where it stopped), as a nested flow run; its directory.

    workdir: on a cluster, the submitting process's working directory (relative paths in
    the config resolve from there); None: this task runs in the submitting process."""
    from flows.continual import continual_flow

    if workdir and os.getcwd() != workdir and Path(workdir).is_dir():
        os.chdir(workdir)
    with torch_threads(threads, restore=workdir is None):
        continual_flow(config, Path(run_dir), tracking_uri, Path(data_dir) if data_dir else None, progress=progress)
    return run_dir


@flow(name="copal-runs", validate_parameters=False)
def runs_flow(planned: list[PlannedRun], runner: str, resources: Resources, tracking_uri: str | None = None,
              data_dir: str | None = None, progress: Progress | None = None) -> dict[str, Exception]:
    """Every run; {run name: error} for those that failed. Locally one at a time, on a
    cluster all at once (each reserving `resources`)."""
    where = parse_runner(runner)
    workdir = os.getcwd() if where.cluster else None
    # On a cluster each run pins the thread count it would have here (float results depend
    # on it), so the cluster's numbers are this machine's whatever its workers' size.
    threads = (resources.cpus or torch.get_num_threads()) if where.cluster else resources.cpus
    failures: dict[str, Exception] = {}

    def start(run: PlannedRun):
        named = run_task.with_options(task_run_name=f"run {run.name}")
        return submit(named, where, resources, run.config, str(run.directory), tracking_uri, data_dir, threads,
                      workdir, progress)

    if where.cluster:
        futures = {start(run): run for run in planned}
        for future in as_completed(list(futures)):
            _collect(futures[future], future, failures)
        return failures
    for run in planned:
        future = start(run)
        future.wait()
        _collect(run, future, failures)
    return failures


def _collect(run: PlannedRun, future, failures: dict[str, Exception]) -> None:
    """A finished run's outcome: a failure is recorded and logged, and costs no other run."""
    try:
        future.result()
    except Exception as error:  # noqa: BLE001 - reported with the others at the end
        failures[run.name] = error
        log.error("run %s failed: %s", run.name, error, exc_info=None if isinstance(error, InputError) else error)


def run_all(planned: list[PlannedRun], runner: Runner, resources: Resources, tracking_uri: str | None,
            data_dir: Path | None, api=None, progress: Progress | None = None) -> dict[str, Exception]:
    """The runs' flow on `runner` (checked first: it answers and can hold a run); the failures.
    `api`: a flows.api.TemporaryApi already booting, for the local runner."""
    with attached(runner, resources):
        if api is not None:
            api.ready()
        return runs_flow.with_options(task_runner=task_runner(runner, 1))(
            planned, str(runner), resources, tracking_uri, str(data_dir) if data_dir else None,
            # A display callback does not pickle: a cluster's runs show no progress here.
            progress=None if runner.cluster else progress)


def failure_message(failures: dict[str, Exception], total: int) -> str:
    listing = "; ".join(f"{name}: {error}" for name, error in failures.items())
    return f"{len(failures)} of {total} runs failed ({listing})"
