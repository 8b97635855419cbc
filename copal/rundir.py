"""A run directory on disk: its files, its config, its steps and their lineage.

    RUN_DIR/config.yaml     the resolved config, with each domain's data fingerprint
    RUN_DIR/dense.json      PPL of the dense model per domain (row 0 of the matrix)
    RUN_DIR/steps/K/        what step K recorded (see copal.state)
    RUN_DIR/HEAD            the current step id
    RUN_DIR/metrics.json    PPL matrix, BWT, average PPL, per-step cost
    RUN_DIR/.lock           held by the one process that writes the run (`RunDir.lock`)

Steps have ids 1, 2, … in the order they were made and a `parent` (the step
they continued from), so a rollback can make an older step the head again
without deleting later ones. The PPL matrix follows the lineage of HEAD.
"""

import logging
from contextlib import contextmanager
from pathlib import Path

import yaml

from copal import metrics
from copal.atomic import check_target, exclusive_lock, lock_holder, write_atomic
from copal.config import RunConfig, build_config
from copal.errors import InputError
from copal.records import RunMetrics, StepRecord, StepSummary
from copal.state import StepState, read_json

# Keys that may differ between two invocations of the same run: where it computes, and
# the stored form of the accumulated statistic (a lineage keeps its first step's format
# whatever the config says later, copal.state), so a run started before `state` existed
# resumes under a config that pins it.
_RUNTIME_KEYS = ("device", "state")
LOCK_FILE = ".lock"

log = logging.getLogger("copal")


class RunDir:
    """The files of one run directory."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.config_path = self.root / "config.yaml"
        self.steps_dir = self.root / "steps"
        self.head_path = self.root / "HEAD"
        self.metrics_path = self.root / "metrics.json"
        self.dense_path = self.root / "dense.json"
        self.dense_tasks_path = self.root / "dense_tasks.json"
        self.lock_path = self.root / LOCK_FILE

    def exists(self) -> bool:
        return self.config_path.is_file()

    def _busy(self, holder: str) -> None:
        raise InputError(f"{self.root}: in use by {holder} (another copal command writes this run); "
                         f"wait for it to finish")

    @contextmanager
    def lock(self):
        """Exclusive right to write the run, for the process's lifetime at most: a second
        writer gets an InputError naming the holder; a lock left by a process that died
        is taken over with a warning."""
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"{self.root}: exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        stale = lambda holder: log.warning("%s: taking over the lock of %s, which is no longer running",  # noqa: E731
                                           self.root, holder)
        with exclusive_lock(self.lock_path, busy=self._busy, stale=stale):
            yield self

    def check_unlocked(self) -> None:
        """An InputError if another process writes the run now (a quick check before any work)."""
        holder = lock_holder(self.lock_path) if self.root.is_dir() else None
        if holder:
            self._busy(holder)

    def require(self) -> "RunDir":
        if not self.root.is_dir():
            raise InputError(f"{self.root}: run directory not found")
        if not self.exists():
            raise InputError(f"{self.root}: not a run directory (no config.yaml)")
        return self

    def read_config(self) -> tuple[RunConfig, dict[str, str]]:
        try:
            raw = yaml.safe_load(self.config_path.read_text())
        except yaml.YAMLError:
            raise InputError(f"{self.config_path}: corrupt run config (not valid YAML)") from None
        if not isinstance(raw, dict):
            raise InputError(f"{self.config_path}: corrupt run config")
        fingerprints = raw.pop("fingerprints", {}) or {}
        return build_config(raw, str(self.config_path)), fingerprints

    def write_config(self, config: RunConfig, fingerprints: dict[str, str]) -> None:
        """config.yaml, rewritten only when its content changes."""
        text = yaml.safe_dump(config.model_dump() | {"fingerprints": fingerprints}, sort_keys=False)
        if self.config_path.is_file() and self.config_path.read_text() == text:
            return
        write_atomic(self.config_path, text)

    def head(self) -> int:
        if not self.head_path.exists():
            return 0
        text = self.head_path.read_text().strip()
        if not text.isdigit():
            raise InputError(f"{self.head_path}: corrupt HEAD ({text!r})")
        return int(text)

    def set_head(self, step_id: int) -> None:
        write_atomic(self.head_path, f"{step_id}\n")

    # Records a run keeps beside its steps (the last two written by the pipeline's
    # MLflow and DVC tasks); each must be a JSON object.
    RECORDS = ("dense.json", "dense_tasks.json", "tracking.json", "snapshots.json")

    def check_records(self) -> None:
        """Every record file present parses as a JSON object (an InputError naming it otherwise)."""
        for name in self.RECORDS:
            path = self.root / name
            if path.exists() and not isinstance(read_json(path, "run record"), dict):
                raise InputError(f"{path}: run record is corrupt (not a JSON object)")

    def step_ids(self) -> list[int]:
        if not self.steps_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.steps_dir.iterdir() if p.name.isdigit())

    def step(self, step_id: int) -> StepState:
        folder = self.steps_dir / str(step_id)
        if not folder.is_dir():
            known = self.step_ids()
            span = f"recorded steps: {known[0]}..{known[-1]}" if known else "no steps recorded yet"
            raise InputError(f"{self.root}: no step {step_id} ({span})")
        return StepState(folder, required=("step", "parent", "domain", "fingerprint", "ppl"))

    def lineage(self, head: int | None = None) -> list[StepState]:
        """Steps from the first to `head` (default HEAD), following parents."""
        chain = []
        step_id = self.head() if head is None else head
        while step_id:
            state = self.step(step_id)
            chain.append(state)
            parent = state.record.parent
            if not 0 <= parent < step_id:
                raise InputError(f"{state.folder / 'step.json'}: corrupt parent {parent!r} (a step continues an "
                                 f"earlier one)")
            step_id = parent
        return chain[::-1]


def check_trust(run_dir: RunDir, config: RunConfig, trust_remote_code: bool) -> None:
    """A run directory's config may not turn on running a model's own code by itself:
    the command line must say so too."""
    if config.trust_remote_code and not trust_remote_code:
        raise InputError(f"{run_dir.config_path}: says trust_remote_code: true; running the model's own code "
                         f"needs --trust-remote-code on the command line too")


def _same_run(recorded: RunConfig, wanted: RunConfig) -> str | None:
    """None if `wanted` continues the recorded run, else what differs."""
    old, new = recorded.model_dump(), wanted.model_dump()
    for key in old:
        if key in _RUNTIME_KEYS or key == "domains":
            continue
        if old[key] != new[key]:
            return f"{key}: {old[key]!r} recorded, {new[key]!r} given"
    shorter = min(len(old["domains"]), len(new["domains"]))
    if old["domains"][:shorter] != new["domains"][:shorter]:
        return f"domains: {old['domains']} recorded, {new['domains']} given"
    return None


def reconcile(run_dir: RunDir, config: RunConfig) -> tuple[RunConfig, dict[str, str]]:
    """The config to run in `run_dir` (with any domains the run added) and the
    recorded fingerprints; an error if the directory holds another run."""
    if run_dir.exists():
        recorded, fingerprints = run_dir.read_config()
        difference = _same_run(recorded, config)
        if difference:
            raise InputError(f"{run_dir.root}: holds a run of another config ({difference})")
        if len(recorded.domains) > len(config.domains):
            config = config.model_copy(update={"domains": recorded.domains})
        return config, fingerprints
    check_target(run_dir.root, "the run directory")
    if run_dir.root.exists() and any(p.name != LOCK_FILE for p in run_dir.root.iterdir()):
        raise InputError(f"{run_dir.root}: exists and is not a run directory; choose an empty or new --out")
    return config, {}


def summarize(run_dir: RunDir, config: RunConfig, head: int | None = None) -> RunMetrics:
    """metrics.json's content, derived from the records of the lineage of `head`
    (default HEAD). Columns: the lineage's domains in step order, then the run's
    other domains."""
    lineage = [state.record for state in run_dir.lineage(head)]
    dense = read_json(run_dir.dense_path, "dense PPLs") if run_dir.dense_path.exists() else {}
    names = list(dict.fromkeys([record.domain for record in lineage] + list(dense)))
    matrix = [[record.ppl.get(name) for name in names] for record in lineage]
    step_columns = [names.index(record.domain) for record in lineage]
    return RunMetrics(
        model=config.model, method=config.method, regime=config.regime,
        structure=config.structure, sparsity=config.sparsity, seqlen=config.evaluation.seqlen,
        domains=names, dense_ppl=[dense.get(name) for name in names],
        ppl=matrix, bwt=metrics.bwt(matrix, step_columns),
        avg_ppl=metrics.average_ppl(matrix, step_columns),
        steps=[_step_summary(record, run_dir.steps_dir / str(record.step), bool(config.evaluation.tasks))
               for record in lineage],
        **_dense_tasks(run_dir, config))


def _step_summary(record: StepRecord, folder: Path, with_tasks: bool) -> StepSummary:
    """A step's row in metrics.json's `steps`; its task accuracies only in a run with evaluation.tasks."""
    stored = [folder / name for name in record.files or {}]
    summary = StepSummary(step=record.step, domain=record.domain, seconds=record.seconds,
                          prune_seconds=record.prune_seconds, peak_rss_mb=record.peak_rss_mb,
                          sparsity=record.sparsity,
                          state_bytes=sum(path.stat().st_size for path in stored if path.exists()) if stored else None)
    return summary.model_copy(update={"tasks": record.tasks}) if with_tasks else summary


def _dense_tasks(run_dir: RunDir, config: RunConfig) -> dict:
    """metrics.json's `dense_tasks` (task accuracies of the dense model), only for a
    run with evaluation.tasks."""
    if not config.evaluation.tasks:
        return {}
    dense = read_json(run_dir.dense_tasks_path, "dense task accuracies") if run_dir.dense_tasks_path.exists() else {}
    return {"dense_tasks": dense.get("tasks")}
