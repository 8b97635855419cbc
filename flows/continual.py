"""Prefect flows: a continual run, one more step, and the scheduled step.

A step is the task chain ingest → calibrate → sensitivity-and-masks →
evaluate → record → track-mlflow → snapshot-dvc. The run directory is the
cache: a step recorded there is never recomputed, so a run killed at any point
restarts at the first unrecorded step (and records in MLflow/DVC whatever a
crash left unrecorded there).

By default Prefect runs against a temporary local API (no server to start);
set PREFECT_API_URL to use a Prefect server.
"""

import logging
from pathlib import Path

from prefect import flow, get_run_logger

from copal import lifecycle
from copal.errors import InputError
from copal.evaluator import Evaluator
from copal.progress import Progress
from copal.records import RunMetrics, StepRecord
from copal.rundir import RunDir
from copal.session import RunSession
from tasks import steps
from tasks.snapshot import revisions
from tasks.tracking import Tracker

log = logging.getLogger("copal")

# A flow's progress callback (copal.progress), e.g. the command line's display, is
# recorded in Prefect as a placeholder ("<function>"): it is not data, and Prefect
# stores what it cannot serialise that way.


def _step(session: RunSession, evaluator: Evaluator, tracker: Tracker, domain_index: int,
          publishing: list) -> StepRecord:
    step = steps.calibrate(session, domain_index)
    try:
        steps.prune(session, step)
        evaluation = steps.evaluate(evaluator, step)
        record = steps.record(session, step, evaluation)
    except BaseException:
        step.writer.discard()  # no .partial left behind
        raise
    publishing.append(_publish(session, tracker, record.step, after=publishing[-1:]))
    return record


def _publish(session: RunSession, tracker: Tracker, step_id: int, after: list = ()):
    """Track the step in MLflow, then snapshot it with DVC, in the background: the
    next step computes meanwhile. Steps publish in order (each waits for `after`);
    the future of the snapshot is returned, for `_finish_publishing`."""
    tracked = steps.track.submit(tracker, session, step_id, wait_for=list(after))
    return steps.snapshot.submit(session, step_id, wait_for=[tracked])


def _finish_publishing(publishing: list) -> None:
    """Wait for every background publication; the first failure fails the flow.
    A step recorded but not published is published by the next run (`_catch_up`)."""
    for future in publishing:
        future.result()


def _catch_up(session: RunSession, tracker: Tracker, publishing: list) -> None:
    """Track/snapshot steps a crash recorded on disk but not in MLflow/DVC."""
    snapshotted = revisions(session.dir)
    for state in session.dir.lineage():
        if str(state.id) not in tracker.steps() or str(state.id) not in snapshotted:
            get_run_logger().info("step %d was recorded but not published; publishing it now", state.id)
            publishing.append(_publish(session, tracker, state.id, after=publishing[-1:]))


@flow(name="copal-run")
def continual_flow(config, out: Path, tracking_uri: str | None = None, data_dir: Path | None = None,
                   progress: Progress | None = None) -> RunMetrics:
    """Every pending domain of the config, one step each (holding the run directory's lock)."""
    with RunDir(out).lock():
        session = steps.open_run(config, out, progress, data_dir)
        evaluator = Evaluator(session)
        tracker = Tracker(session.dir, tracking_uri)
        tracker.ensure_parent(session.config)
        steps.dense_eval(evaluator)
        publishing = []
        _catch_up(session, tracker, publishing)
        for state in session.dir.lineage():
            log.info("step %d (%s) already recorded; not recomputed", state.id, state.record.domain)
        for index in lifecycle.remaining(session):
            log.info("step on domain %d/%d: %s", index + 1, len(session.domains), session.domains[index].name)
            _step(session, evaluator, tracker, index, publishing)
        metrics = lifecycle.write_metrics(session)
        _finish_publishing(publishing)
        tracker.finish_parent()
    return metrics


@flow(name="copal-step")
def step_flow(data: str, run_dir: Path, tracking_uri: str | None = None, data_dir: Path | None = None,
              progress: Progress | None = None) -> StepRecord:
    """One more step on `data` for an existing run, continuing from its HEAD (holding its lock)."""
    directory = RunDir(run_dir).require()
    with directory.lock():
        config, _ = directory.read_config()
        session = steps.open_run(config, run_dir, progress, data_dir)
        evaluator = Evaluator(session)
        tracker = Tracker(session.dir, tracking_uri)
        tracker.ensure_parent(session.config)
        publishing = []
        _catch_up(session, tracker, publishing)
        index = steps.ingest(session, data)
        steps.dense_eval(evaluator)
        record = _step(session, evaluator, tracker, index, publishing)
        _finish_publishing(publishing)
        tracker.finish_parent()
    return record


def next_in_queue(run_dir: Path, queue: Path | None) -> str | None:
    """The next domain a scheduled run should take: the first file or folder of
    `queue` (in name order) not yet stepped on in HEAD's lineage, else the first
    configured domain not yet stepped on; None when there is nothing left."""
    from copal.sources import parse_source

    directory = RunDir(run_dir).require()
    config, _ = directory.read_config()
    done = {state.record.domain for state in directory.lineage()}
    candidates = list(config.domains)
    if queue is not None:
        if not queue.is_dir():
            raise InputError(f"{queue}: queue folder not found")
        kinds = {".txt": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
        for entry in sorted(queue.iterdir()):
            kind = "text" if entry.is_dir() else kinds.get(entry.suffix)
            if kind:
                candidates.append(f"{kind}:{entry.resolve()}")
    for spec in candidates:
        if parse_source(spec).name not in done:
            return spec
    return None


@flow(name="copal-scheduled-step")
def scheduled_step_flow(run_dir: str, queue: str | None = None, tracking_uri: str | None = None) -> StepRecord | None:
    """What a schedule triggers: one step on the next domain of the queue."""
    spec = next_in_queue(Path(run_dir), Path(queue) if queue else None)
    if spec is None:
        get_run_logger().info("nothing left in the queue of %s; no step taken", run_dir)
        return None
    get_run_logger().info("next domain for %s: %s", run_dir, spec)
    return step_flow(spec, Path(run_dir), tracking_uri)
