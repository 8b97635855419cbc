"""A continual run in one process, without Prefect: the session (copal.session),
its evaluator (copal.evaluator) and the loop over domains of copal.lifecycle's
steps; and `preflight`, which checks a run's inputs before any of it loads.

The Prefect flow (flows/continual.py) drives the same pieces itself; tests,
benchmarks and the benchmark grid's cells use `ContinualRun`."""

import logging
from pathlib import Path
from typing import Callable

from copal import lifecycle
from copal.config import RunConfig
from copal.domains import RunDomains
from copal.evaluator import Evaluator
from copal.model import check_architecture, load_tokenizer
from copal.records import RunMetrics, StepRecord
from copal.replay import ReplayResult, replay_step
from copal.rundir import RunDir, reconcile
from copal.progress import Progress
from copal.session import RunSession

log = logging.getLogger("copal")


def preflight(config: RunConfig, root: Path, new_specs: tuple[str, ...] = (), data_dir: Path | None = None) -> None:
    """Check every input of a run (directory, model files, data, lengths) without
    loading the model, so bad input fails in seconds, before any orchestration."""
    run_dir = RunDir(root)
    config, fingerprints = reconcile(run_dir, config)
    run_dir.check_unlocked()
    run_dir.check_records()
    if run_dir.head():
        run_dir.step(run_dir.head()).verify()
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    check_architecture(config.model, config.trust_remote_code)
    domains = RunDomains(config, tokenizer, fingerprints, data_dir)
    for spec in list(config.domains) + [spec for spec in new_specs if spec not in config.domains]:
        domains.add(spec)
    if config.evaluation.tasks:
        from copal.lm_eval_tasks import check_tasks

        check_tasks(config.evaluation.tasks, config.evaluation.task_include_path)


def run_all(session: RunSession, evaluator: Evaluator, step: Callable[[int], StepRecord] | None = None) -> RunMetrics:
    """The dense row, then a step on every domain HEAD's lineage has not stepped on, in
    order (recorded steps are kept as they are); metrics.json's payload."""
    step = step or (lambda index: lifecycle.run_step(session, evaluator, index))
    evaluator.dense_ppl()
    for state in session.dir.lineage():
        log.info("step %d (%s) already recorded; not recomputed", state.id, state.record.domain)
    for index in lifecycle.remaining(session):
        log.info("step on domain %d/%d: %s", index + 1, len(session.domains), session.domains[index].name)
        step(index)
    return lifecycle.write_metrics(session)


class ContinualRun:
    """A session and its evaluator, for driving a whole run (or one step, or a replay) in this process."""

    def __init__(self, config: RunConfig, root: Path, progress: Progress | None = None,
                 data_dir: Path | None = None, readonly: bool = False, known_dense: dict[str, float] | None = None,
                 streaming: bool | None = None):
        """See copal.session.RunSession and copal.evaluator.Evaluator for the arguments."""
        self.session = RunSession(config, root, progress, data_dir, readonly, streaming)
        self.evaluator = Evaluator(self.session, known_dense)

    @property
    def dir(self) -> RunDir:
        return self.session.dir

    def run(self) -> RunMetrics:
        return run_all(self.session, self.evaluator)

    def step(self, domain_index: int) -> StepRecord:
        return lifecycle.run_step(self.session, self.evaluator, domain_index)

    def replay(self, step_id: int) -> ReplayResult:
        return replay_step(self.session, step_id)
