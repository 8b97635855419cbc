"""`copal bench` as a Prefect flow: each cell of the grid (copal/grid.py) is a task
that does one continual run and returns its run directory; each cell is an MLflow
child run under one parent run for the grid; the report (copal/bench_report.py)
is written from the cells' directories once they have run.

Where the cells run is the flow's task runner (flows/runners.py). Locally, cells run
alone (the cost cells, and the first cell when nothing tells how much memory a cell
takes) run in this process with every core; the others run in a pool of spawned
processes, as many at once as fit in memory (or --jobs), sharing the cores. A thread
waits on each process, so Prefect sees every cell as a task and only this process
talks to Prefect's API. On a cluster each cell reserves `grid.resources`, and the
workers write the cells' directories: OUT, the data cache and the model must be at
the same paths there (a shared file system).
MLflow is written only from this process, from what the cells recorded on disk.
"""

import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed

from copal.allocator import limit_allocator_fragmentation
from copal.atomic import write_atomic
from copal.bench_report import summarize_grid, write_markdown, write_plots
from copal.config import RunConfig
from copal.errors import InputError
from copal.grid import (Cell, Grid, Resources, available_memory_mb, cell_config, cell_dir,
                        cost_cells, default_jobs, default_out, grid_accuracy, is_finished, measured_peak_mb, plan,
                        run_cell, shared_dense)
from copal.records import BenchAccuracy, BenchSummary
from copal.progress import Progress
from flows.api import TemporaryApi
from flows.runners import Runner, attached, parse_runner, submit, task_runner
from tasks.tracking import GridTracker

log = logging.getLogger("copal")

# ----------------------------------------------------------------------------- the flow


# The task's and the flow's functions only call module functions: Ray Client pickles them
# by value, with the globals they use. What only the local runner has (the process pool,
# the progress display) comes as arguments, None on a cluster.
@task(name="bench-cell", cache_policy=NO_CACHE, persist_result=False)
def cell_task(config: RunConfig, root: str, data_dir: str | None, threads: int | None, known_dense: dict | None,
              workdir: str | None = None, pool: ProcessPoolExecutor | None = None,
              progress: Progress | None = None) -> str:
    """One cell (one continual run, resumed where it stopped); its run directory."""
    return _cell(config, root, data_dir, threads, known_dense, workdir, pool, progress)


def _cell(config: RunConfig, root: str, data_dir: str | None, threads: int | None, known_dense: dict | None,
          workdir: str | None, pool: ProcessPoolExecutor | None, progress: Progress | None) -> str:
    """One cell (one continual run, resumed where it stopped); its run directory.

    pool: the local runner's process pool, to run the cell in; otherwise it runs in this
    task's process (this one, or a Ray/Dask worker, started in `workdir` so relative paths
    resolve)."""
    data = Path(data_dir) if data_dir else None
    if pool is not None:
        return str(pool.submit(run_cell, config, Path(root), data, threads, None, known_dense).result())
    if workdir and os.getcwd() != workdir and Path(workdir).is_dir():
        os.chdir(workdir)
    limit_allocator_fragmentation()  # a Ray/Dask worker's process prunes too (the command line's has it)
    return str(run_cell(config, Path(root), data, threads, progress, known_dense))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@flow(name="copal-bench", validate_parameters=False)
def bench_flow(base: RunConfig, grid: Grid, cells: list[Cell], out_dir: Path, runner: str = "local",
               jobs: int | None = None, data_dir: Path | None = None, tracking_uri: str | None = None,
               quick: bool = False, alone: list[Cell] | None = None,
               progress: Progress | None = None) -> dict[str, Exception]:
    """Run every unfinished cell of the grid; {cell id: error} for the cells that failed.
    `progress` (the command line's display) is recorded by Prefect as a placeholder."""
    return _grid(base, grid, cells, out_dir, runner, jobs, data_dir, tracking_uri, quick, alone, progress)


def _grid(base: RunConfig, grid: Grid, cells: list[Cell], out_dir: Path, runner: str, jobs: int | None,
          data_dir: Path | None, tracking_uri: str | None, quick: bool, alone: list[Cell] | None,
          progress: Progress | None = None) -> dict:
    """Run every unfinished cell of the grid; {cell id: error} for the cells that failed.

    The `alone` cells (default: the cost cells) run first, one at a time; then the rest at once (locally: as
    many as fit in memory, or --jobs; on a cluster: as its resources allow)."""
    from copal.data import ingest

    fingerprints = {}
    for spec in base.domains:  # bad data fails here, once; the cells then find the Arrow cache warm
        domain = ingest(spec, data_dir)
        fingerprints[domain.name] = domain.fingerprint
    configs = {cell.id: cell_config(base, cell) for cell in cells}  # every cell's config checked before any runs
    tracker = GridTracker(out_dir, tracking_uri)
    tracker.ensure_parent(base, quick)
    launcher = _Launcher(base, cells, configs, out_dir, data_dir, parse_runner(runner), grid.resources,
                         fingerprints, tracker, progress)
    pending = launcher.unfinished()
    # Every cell's torch thread count is planned here, as the local runner runs it, and pinned
    # wherever it runs: float results depend on it, so a cluster of any size gives the local
    # numbers bit for bit. `cpus` if set; else every thread of this process for a cell run
    # alone, and this machine's cores shared among the cells that run at once.
    alone_threads = grid.resources.cpus or torch.get_num_threads()
    first = [cell for cell in (cost_cells(cells) if alone is None else alone) if cell in pending]
    if jobs is None and not first and pending and measured_peak_mb(out_dir, cells) is None:
        first = pending[:1]
    launcher.one_at_a_time(first, alone_threads)
    pending = [cell for cell in pending if cell not in first]
    if pending:
        _run_together(launcher, pending, jobs, alone_threads)
    return launcher.failures


def _run_together(launcher: "_Launcher", pending: list[Cell], jobs: int | None, alone_threads: int) -> None:
    """The cells after those run alone: on a cluster all at once; locally `jobs` at a time
    (default: as many as fit in memory by the peak RSS measured so far), each process
    with its share of the cores."""
    where, resources = launcher.where, launcher.resources
    cores = _cores()
    if jobs is None:
        peak = measured_peak_mb(launcher.out_dir, launcher.cells)
        jobs = default_jobs(peak, available_memory_mb(), cores) if peak else 1
        if resources.cpus:
            jobs = max(1, min(jobs, cores // resources.cpus))
        if not where.cluster:
            log.info("per-cell peak RSS %s MB: running %d cell(s) at a time", f"{peak:.0f}" if peak else "?", jobs)
    workers = min(jobs, len(pending))
    threads = alone_threads if workers == 1 else resources.cpus or max(1, cores // workers)
    if where.cluster:
        launcher.at_once(pending, threads)
    elif workers == 1:
        launcher.one_at_a_time(pending, threads)
    else:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=limit_allocator_fragmentation) as pool:
            launcher.at_once(pending, threads, pool)


@dataclass
class _Launcher:
    """One grid's cells on their way: where they run and with what, and the tally of those
    finished (each logged to MLflow) or failed (one broken cell must not cost the others)."""

    base: RunConfig
    cells: list[Cell]
    configs: dict[str, RunConfig]  # by cell id
    out_dir: Path
    data_dir: Path | None
    where: Runner
    resources: Resources
    fingerprints: dict[str, str]
    tracker: GridTracker
    progress: Progress | None
    done: int = 0
    failures: dict[str, Exception] = field(default_factory=dict)

    def report(self) -> None:
        if self.progress is not None:
            self.progress("cells", self.done, len(self.cells))

    def unfinished(self) -> list[Cell]:
        """The cells still to run; the finished ones logged to MLflow if a crash left them unlogged."""
        pending = [cell for cell in self.cells if not is_finished(self.out_dir, cell, len(self.base.domains))]
        self.done = len(self.cells) - len(pending)
        if self.done:
            log.info("%d of %d cells already finished; skipped", self.done, len(self.cells))
            for cell in self.cells:
                if cell not in pending:
                    self.tracker.log_cell(cell, self.where)  # a cell finished before its child run was logged
        self.report()
        return pending

    def submit(self, cell: Cell, threads: int, pool: ProcessPoolExecutor | None = None):
        dense = shared_dense(self.out_dir, self.cells, self.base, self.fingerprints)
        named = cell_task.with_options(task_run_name=f"cell {cell.id}")
        shown = None if self.where.cluster or pool is not None else self.progress
        workdir = os.getcwd() if self.where.cluster else None
        return submit(named, self.where, self.resources, self.configs[cell.id],
                      str(cell_dir(self.out_dir, cell)), str(self.data_dir) if self.data_dir else None, threads,
                      dense, workdir, pool, shown)

    def finished(self, cell: Cell, future) -> None:
        self.done += 1
        self.report()
        try:
            future.result()
        except Exception as error:  # one broken cell must not cost the others
            self.failures[cell.id] = error
            log.error("cell %s failed: %s", cell.id, error, exc_info=None if isinstance(error, InputError) else error)
            return
        self.tracker.log_cell(cell, self.where)
        log.info("cell %s finished (%d/%d)", cell.id, self.done, len(self.cells))

    def one_at_a_time(self, cells: list[Cell], threads: int) -> None:
        for cell in cells:
            future = self.submit(cell, threads)
            future.wait()
            self.finished(cell, future)

    def at_once(self, cells: list[Cell], threads: int, pool: ProcessPoolExecutor | None = None) -> None:
        futures = {self.submit(cell, threads, pool): cell for cell in cells}
        for future in as_completed(list(futures)):
            self.finished(futures[future], future)


def run_benchmark(config_path: Path | None = None, out_dir: Path | None = None, quick: bool = False,
                  jobs: int | None = None, data_dir: Path | None = None, runner: str = "local",
                  tracking_uri: str | None = None, api=None, progress: Progress | None = None,
                  report_only: bool = False) -> tuple[BenchSummary, list[Path]]:
    """The whole benchmark: run (or resume) the grid's flow on `runner`, then the task
    accuracy of the chosen cells (here), then JSON, Markdown and plots.

    Every input is checked before anything runs. Failed cells are left out of the
    outputs (listed as missing) and reported once everything else is written.
    `api`: a flows.api.TemporaryApi already booting (the command line starts one).
    report_only: run nothing and measure nothing; write the outputs from the cells (and
    task accuracies) recorded so far, unfinished cells listed as not yet run."""
    if jobs is not None and jobs < 1:
        raise InputError(f"--jobs {jobs}: must be at least 1")
    where = parse_runner(runner)
    if where.cluster and jobs is not None:
        raise InputError(f"--jobs {jobs}: only for --runner local (a cluster runs as many cells at once as "
                         "grid.resources and its workers allow)")
    out_dir = Path(out_dir) if out_dir else default_out(quick)
    base, grid, cells = plan(config_path, quick)
    if report_only:
        accuracy = grid_accuracy(base, grid.tasks, cells, out_dir, measure=False)
        return write_outputs(base, cells, out_dir, quick, accuracy, None)
    if where.cluster:  # the workers see these paths, not this process's working directory
        out_dir = out_dir.resolve()
        from copal.data import arrow_dir

        data_dir = arrow_dir(data_dir).resolve()
    GridTracker(out_dir, tracking_uri)  # a grid recorded elsewhere in MLflow is bad input: say so now
    with attached(where, grid.resources):  # an impossible request fails here, before the flow starts
        (api or TemporaryApi()).ready()
        failures = bench_flow.with_options(task_runner=task_runner(where, len(cells)))(
            base, grid, cells, out_dir, str(where), jobs, data_dir, tracking_uri, quick,
            # On a cluster prefect-ray pickles the flow run's context, parameters included, with
            # each task; a display callback does not pickle, so the flow shows no progress there.
            progress=None if where.cluster else progress)
    accuracy = grid_accuracy(base, grid.tasks, cells, out_dir, progress)
    summary, written = write_outputs(base, cells, out_dir, quick, accuracy, where.kind)
    tracker = GridTracker(out_dir, tracking_uri)
    tracker.finish(written[:2], failed=bool(failures))
    if failures:
        listing = "; ".join(f"{cell}: {error}" for cell, error in failures.items())
        message = f"{len(failures)} of {len(cells)} benchmark cells failed ({listing})"
        if all(isinstance(error, InputError) for error in failures.values()):
            raise InputError(message)
        raise RuntimeError(message)
    return summary, written


def write_outputs(base: RunConfig, cells: list[Cell], out_dir: Path, quick: bool, accuracy: BenchAccuracy | None,
                  runner: str | None) -> tuple[BenchSummary, list[Path]]:
    """OUT/benchmark.{json,md} and the plots, from the cells recorded in OUT/cells."""
    summary = summarize_grid(base, cells, out_dir).model_copy(update={"quick": quick, "accuracy": accuracy,
                                                                      "runner": runner})
    images = write_plots(summary, out_dir)
    written = [write_atomic(out_dir / "benchmark.json", json.dumps(summary.as_json(), indent=1) + "\n"),
               write_atomic(out_dir / "benchmark.md", write_markdown(summary, [p.name for p in images])), *images]
    return summary, written
