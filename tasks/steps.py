"""Prefect tasks: thin wrappers around the library's step pieces, so each shows
up in Prefect's UI and logs with its own duration. Bad input is never retried;
tracking and snapshots retry transient failures."""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from copal.continual import ContinualRun, PendingStep
from copal.errors import InputError
from copal.records import StepRecord
from tasks.snapshot import record_revision, snapshot_step
from tasks.tracking import Tracker


def _retry_unless_bad_input(task_, task_run, state) -> bool:
    try:
        state.result()
    except InputError:
        return False
    except Exception:
        return True
    return False


# Live objects (the model, the run) are passed between tasks in this process:
# no input hashing, no result persistence.
_local = dict(cache_policy=NO_CACHE, persist_result=False)


@task(name="open-run", **_local)
def open_run(config, out: Path, progress=None, data_dir: Path | None = None) -> ContinualRun:
    """Load the model, ingest every configured domain into Arrow, validate the run directory."""
    return ContinualRun(config, out, progress=progress, data_dir=data_dir)


@task(name="ingest", **_local)
def ingest(run: ContinualRun, spec: str) -> int:
    """Ingest one more domain into Arrow (a no-op for one the run has); its index."""
    return run.domain_index(spec)


@task(name="dense-eval", **_local)
def dense_eval(run: ContinualRun) -> dict:
    return run.dense_ppl()


@task(name="calibrate", **_local)
def calibrate(run: ContinualRun, domain_index: int) -> PendingStep:
    """Open the step and draw its calibration sequences."""
    pending = run.start_step(domain_index)
    run.calibrate(pending)
    return pending


@task(name="sensitivity-and-masks", **_local)
def prune(run: ContinualRun, pending: PendingStep) -> None:
    """Update the sensitivity state and apply masks, block by block."""
    run.prune(pending)


@task(name="evaluate", **_local)
def evaluate(run: ContinualRun, pending: PendingStep) -> dict:
    return run.evaluate(pending)


@task(name="record", **_local)
def record(run: ContinualRun, pending: PendingStep, evaluation: dict) -> StepRecord:
    """Write the step directory whole and make it HEAD."""
    return run.finish_step(pending, evaluation)


@task(name="track-mlflow", retries=3, retry_delay_seconds=2, retry_condition_fn=_retry_unless_bad_input,
      **_local)
def track(tracker: Tracker, run: ContinualRun, step_id: int) -> dict:
    from copal.plots import ppl_heatmap

    from copal.continual import summarize

    metrics = summarize(run.dir, run.config, head=step_id)  # the matrix as of this step, whatever ran since
    rows = ["dense"] + [step.label for step in metrics.steps]
    plot = ppl_heatmap([metrics.dense_ppl] + metrics.ppl, rows, metrics.domains, "perplexity after each step")
    return tracker.record_step(run.dir.step(step_id), metrics, run.config, plot)


@task(name="snapshot-dvc", retries=3, retry_delay_seconds=3, retry_condition_fn=_retry_unless_bad_input,
      **_local)
def snapshot(run: ContinualRun, step_id: int) -> str | None:
    """Version the step directory with DVC; its revision is kept in RUN_DIR/snapshots.json."""
    revision = snapshot_step(run.dir.step(step_id).folder)
    record_revision(run.dir, step_id, revision)
    return revision
