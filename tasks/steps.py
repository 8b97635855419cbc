"""Prefect tasks: thin wrappers around the library's step pieces, so each shows
up in Prefect's UI and logs with its own duration. Bad input is never retried;
tracking and snapshots retry transient failures."""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from copal import lifecycle
from copal.errors import InputError
from copal.evaluator import Evaluator
from copal.lifecycle import PendingStep
from copal.records import StepRecord
from copal.session import RunSession
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
def open_run(config, out: Path, progress=None, data_dir: Path | None = None) -> RunSession:
    """Load the model, ingest every configured domain into Arrow, validate the run directory."""
    return RunSession(config, out, progress=progress, data_dir=data_dir)


@task(name="ingest", **_local)
def ingest(session: RunSession, spec: str) -> int:
    """Ingest one more domain into Arrow (a no-op for one the run has); its index."""
    return session.domain_index(spec)


@task(name="dense-eval", **_local)
def dense_eval(evaluator: Evaluator) -> dict:
    return evaluator.dense_ppl()


@task(name="calibrate", **_local)
def calibrate(session: RunSession, domain_index: int) -> PendingStep:
    """Open the step and draw its calibration sequences."""
    step = lifecycle.start_step(session, domain_index)
    lifecycle.calibrate(session, step)
    return step


@task(name="sensitivity-and-masks", **_local)
def prune(session: RunSession, step: PendingStep) -> None:
    """Update the sensitivity state and apply masks, block by block."""
    lifecycle.prune(session, step)


@task(name="evaluate", **_local)
def evaluate(evaluator: Evaluator, step: PendingStep) -> dict:
    return evaluator.evaluate(step)


@task(name="record", **_local)
def record(session: RunSession, step: PendingStep, evaluation: dict) -> StepRecord:
    """Write the step directory whole and make it HEAD."""
    return lifecycle.finish_step(session, step, evaluation)


@task(name="track-mlflow", retries=3, retry_delay_seconds=2, retry_condition_fn=_retry_unless_bad_input,
      **_local)
def track(tracker: Tracker, session: RunSession, step_id: int) -> dict:
    from copal.plots import ppl_heatmap

    from copal.rundir import summarize

    metrics = summarize(session.dir, session.config, head=step_id)  # the matrix as of this step, whatever ran since
    rows = ["dense"] + [step.label for step in metrics.steps]
    plot = ppl_heatmap([metrics.dense_ppl] + metrics.ppl, rows, metrics.domains, "perplexity after each step")
    return tracker.record_step(session.dir.step(step_id), metrics, session.config, plot)


@task(name="snapshot-dvc", retries=3, retry_delay_seconds=3, retry_condition_fn=_retry_unless_bad_input,
      **_local)
def snapshot(session: RunSession, step_id: int) -> str | None:
    """Version the step directory with DVC; its revision is kept in RUN_DIR/snapshots.json."""
    revision = snapshot_step(session.dir.step(step_id).folder)
    record_revision(session.dir, step_id, revision)
    return revision
