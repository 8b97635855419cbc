"""One continual step as functions of a session (copal.session):

    start_step → calibrate → prune → (evaluate: copal.evaluator) → finish_step

`run_step` chains them; the Prefect flow (flows/continual.py) calls the same
pieces as separate tasks and owns the loop over domains. Nothing here knows
about Prefect, MLflow or DVC."""

import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from copal import metrics
from copal.codecs import CODECS
from copal.environment import environment
from copal.errors import EnvironmentFault
from copal.evaluator import Evaluator, Perplexity
from copal.model import all_prunable
from copal.records import RunMetrics, StepRecord
from copal.rundir import summarize
from copal.session import RunSession
from copal.state import StepState, StepWriter, write_json
from copal.step import prune_step


@dataclass
class PendingStep:
    """A step being computed: where it writes, what it continues from, its clock."""

    domain_index: int
    step_id: int
    parent: StepState | None
    writer: StepWriter
    memory: metrics.PeakMemory
    started: float
    batches: list[torch.Tensor] | None = None
    prune_seconds: float = 0.0
    tasks: dict | None = None  # evaluation.tasks' results: {"tasks": …, "task_items": …}


def start_step(session: RunSession, domain_index: int, parent_id: int | None = None,
               steps_dir: Path | None = None) -> PendingStep:
    """Open a step on `session.domains[domain_index]` continuing from `parent_id` (default HEAD)."""
    run_dir = session.dir
    parent_id = run_dir.head() if parent_id is None else parent_id
    parent = run_dir.step(parent_id) if parent_id else None
    if parent is not None:
        parent.verify()
    step_id = max(run_dir.step_ids(), default=0) + 1
    steps_dir = steps_dir or run_dir.steps_dir
    check_free_space(steps_dir, expected_step_bytes(session, parent))
    writer = StepWriter(steps_dir, step_id, session.config.state.format, session.config.state.hessian)
    if session.regime.records_state:
        writer.recompute_weights(session.method)
    return PendingStep(domain_index, step_id, parent, writer, metrics.PeakMemory(), time.perf_counter())


def expected_step_bytes(session: RunSession, parent: StepState | None) -> int:
    """About what a step writes: its parent's size, else (a lineage's first step) the
    bit-packed masks, the accumulated state in its format and any reconstructed weights."""
    if parent is not None:
        return sum(file.stat().st_size for file in parent.folder.rglob("*") if file.is_file())
    config = session.config
    weights = [module.weight for module in all_prunable(session.model).values()]
    per_weight = 1 / 8
    if config.regime == "accumulate":
        per_weight += CODECS[config.state.format].bits / 8
    if config.method == "sparsegpt" or config.copal.reconstruct:
        per_weight += weights[0].element_size() if weights else 4
    return int(sum(weight.numel() for weight in weights) * per_weight)


def calibrate(session: RunSession, step: PendingStep) -> None:
    """The step's calibration sequences, from the domains its regime chooses."""
    current = session.domains[step.domain_index]
    chosen = session.regime.calibration_domains(current, session.seen_domains(step.parent))
    samples = torch.cat([session.domains.samples(d) for d in chosen])
    step.batches = list(samples.split(session.config.calibration.batch_size))


def prune(session: RunSession, step: PendingStep) -> None:
    """Update the statistic and apply masks, block by block; the model then holds the step's weights."""
    execution = session.execution
    start = time.perf_counter()
    prune_step(execution.model, step.batches, session.method, session.regime, session.structure, execution.dense,
               step.parent, step.writer, session.device, execution.blocks,
               progress=lambda done, total: session.progress("prune blocks", done, total),
               owl=session.config.owl if session.config.sparsity_profile == "owl" else None)
    step.prune_seconds = time.perf_counter() - start
    execution.holds_step(lambda name: step.writer.weight(name, execution.dense))


def step_record(session: RunSession, step: PendingStep, evaluation: dict[str, Perplexity]) -> StepRecord:
    """What step.json holds (StepWriter.commit adds the files' digests)."""
    config = session.config
    domain = session.domains[step.domain_index]
    return StepRecord(
        step=step.step_id, parent=step.parent.id if step.parent else 0,
        index=(step.parent.record.index if step.parent else 0) + 1,
        domain=domain.name, source=domain.source.spec, fingerprint=domain.fingerprint,
        method=config.method, regime=config.regime, structure=config.structure, mask_scope=config.mask_scope,
        sparsity_target=config.sparsity, seed=config.calibration.seed,
        code_revision=_code_revision(),
        tokenization=session.domains.start.record(),
        environment=environment(session.device, config.dtype),
        ppl={name: result.ppl for name, result in evaluation.items()},
        eval_tokens={name: result.tokens for name, result in evaluation.items()},
        sparsity=step.writer.overall_sparsity(), layer_sparsity=step.writer.layer_sparsity(),
        prune_seconds=step.prune_seconds, seconds=time.perf_counter() - step.started,
        peak_rss_mb=step.memory.peak_mb,
        **(step.tasks or {}),
    )


def finish_step(session: RunSession, step: PendingStep, evaluation: dict[str, Perplexity]) -> StepRecord:
    """Write the step whole, make it HEAD, refresh metrics.json."""
    record = step_record(session, step, evaluation)
    final = step.writer.commit(record)
    try:
        session.dir.set_head(step.step_id)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)  # never a recorded step that HEAD's history skips
        raise
    state = StepState(final)
    session.execution.holds_state(state)
    write_metrics(session)
    return state.record


def run_step(session: RunSession, evaluator: Evaluator, domain_index: int) -> StepRecord:
    """One whole step on `session.domains[domain_index]`, continuing from HEAD."""
    step = start_step(session, domain_index)
    try:
        calibrate(session, step)
        prune(session, step)
        return finish_step(session, step, evaluator.evaluate(step))
    except BaseException:
        step.writer.discard()
        raise


def remaining(session: RunSession) -> list[int]:
    """Indices of the run's domains that HEAD's lineage has not stepped on yet."""
    done = {state.record.domain for state in session.dir.lineage()}
    return [index for index, domain in enumerate(session.domains) if domain.name not in done]


def write_metrics(session: RunSession) -> RunMetrics:
    """metrics.json: the PPL matrix and its summaries as of HEAD."""
    payload = summarize(session.dir, session.config)
    write_json(session.dir.metrics_path, payload.as_json())
    return payload


def check_free_space(folder: Path, expected: int) -> None:
    """An EnvironmentFault if the file system of `folder` has less than `expected` bytes free."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    free = shutil.disk_usage(existing).free
    if free < expected:
        raise EnvironmentFault(f"{folder}: {_size(free)} free, a step needs about {_size(expected)}")


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count / 1e3:.1f} kB"


def _code_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
