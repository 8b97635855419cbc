"""What a run writes about itself, as types: a step's record (steps/K/step.json),
the run's metrics (metrics.json) and a benchmark cell (a row of benchmark.json).

Readers use attributes, so a renamed or missing field is a type error in one place
rather than a KeyError in whichever reader meets it first. The files on disk stay
as they were: fields are declared in the order they are written, and `as_json()`
leaves out what was never set, so a record written by an older copal (without
`files`, `environment`, `tokenization`, …) reads, and a record dumps back to the
same JSON it was built from. Unknown keys (a newer copal's) are kept, not refused.
"""

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt


class _Record(BaseModel):
    """A JSON object on disk. `as_json()` is its content: only the fields that were set,
    in declaration order (then any unknown keys it was read with)."""

    model_config = ConfigDict(extra="allow")

    def as_json(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)


class Tokenization(_Record):
    """The special tokens every window starts with (copal.tokens.TextStart)."""

    prefix_ids: list[int] = []
    prefix: list[str] = []


class StepRecord(_Record):
    """steps/K/step.json. `step` and `parent` are all a step holds for sure (a replay's
    scratch step records little more); `RunDir.step` requires domain, fingerprint and ppl.
    The defaults are what a reader sees where an older record lacks a field."""

    step: StrictInt
    parent: StrictInt  # the step it continued from, 0 for a lineage's first
    index: int | None = None  # position in its lineage, 1 first
    domain: str = ""
    source: str | None = None
    fingerprint: str | None = None
    method: str | None = None
    regime: str | None = None
    structure: str | None = None
    mask_scope: str | None = None  # row | layer; recorded since ADMM's refit re-runs its choice (None: row)
    sparsity_target: float | None = None
    seed: int | None = None
    code_revision: str | None = None
    tokenization: Tokenization | None = None
    environment: dict[str, Any] | None = None  # copal.environment's facts
    ppl: dict[str, float] = {}  # domain → PPL after this step
    eval_tokens: dict[str, int] = {}
    sparsity: float | None = None  # realised, over every pruned layer
    layer_sparsity: dict[str, float] = {}
    prune_seconds: float | None = None
    seconds: float | None = None
    peak_rss_mb: float | None = None
    tasks: dict[str, dict[str, Any]] | None = None  # lm-eval: task → metric → value
    task_items: dict[str, dict[str, Any]] | None = None  # lm-eval: task → {"items", "sha256"}
    files: dict[str, str] | None = None  # relative path → SHA-256, added by StepWriter.commit
    # the method that recomputes the step's weights from W0, its masks and its state, when
    # it stores none: {"method": name, "options": Method.options()} (copal.state.StepState.weight)
    reweight: dict[str, Any] | None = None


class StepSummary(_Record):
    """One step in metrics.json's `steps` (and a benchmark cell's); `tasks` only in a run
    with evaluation.tasks."""

    step: int
    domain: str
    seconds: float | None = None
    prune_seconds: float | None = None
    peak_rss_mb: float | None = None
    sparsity: float | None = None
    # bytes of the files the step stored (masks, accumulated state, weights): what a run
    # keeps per step on disk
    state_bytes: int | None = None
    tasks: dict[str, dict[str, Any]] | None = None

    @property
    def label(self) -> str:
        """A row label: `2: wiki`."""
        return f"{self.step}: {self.domain}"


class RunMetrics(_Record):
    """metrics.json: the PPL matrix of HEAD's lineage (a row per step, a column per
    domain), its BWT and average PPL, and each step's cost (copal.rundir.summarize)."""

    model: str
    method: str
    regime: str
    structure: str
    sparsity: float
    seqlen: int | None = None
    domains: list[str]
    dense_ppl: list[float | None]
    ppl: list[list[float | None]]
    bwt: float | None = None
    avg_ppl: float | None = None
    steps: list[StepSummary]
    dense_tasks: dict[str, dict[str, Any]] | None = None  # only in a run with evaluation.tasks


class HistoryRow(_Record):
    """A row of the audit view (`copal history`, `--json` prints these): a recorded step
    with its BWT and average PPL along its own lineage, its MLflow run and DVC revision."""

    step: int
    parent: int
    head: bool
    in_head_lineage: bool
    domain: str
    fingerprint: str | None
    method: str | None
    regime: str | None
    structure: str | None
    sparsity: float | None
    ppl_own: float | None  # on the step's own domain
    ppl: dict[str, float]
    avg_ppl: float | None
    bwt: float | None
    mlflow_run_id: str | None
    model_version: str | None
    dvc_revision: str | None


class BenchCell(_Record):
    """A finished cell of the benchmark grid in benchmark.json: its setting and its run's metrics."""

    id: str
    label: str
    method: str
    regime: str
    structure: str
    sparsity: float
    variant: str
    options: dict[str, Any]
    domains: list[str]
    dense_ppl: list[float | None]
    ppl: list[list[float | None]]
    bwt: float | None = None
    avg_ppl: float | None = None
    steps: list[StepSummary]


class DenseRow(_Record):
    """benchmark.json's `dense`: the dense model's PPL per domain, shared by every cell."""

    domains: list[str]
    ppl: list[float | None]
    avg_ppl: float | None = None


class BenchSetup(_Record):
    """benchmark.json's `setup`: what every cell shares."""

    model: str
    domains: list[str]
    calibration: dict[str, Any]
    evaluation: dict[str, Any]
    dtype: str


class BenchNotes(_Record):
    magnitude: str
    variants: dict[str, str]


class TaskSetup(_Record):
    """The grid's lm-eval setting (copal.grid.GridTasks), as the accuracies were measured under."""

    names: list[str] = []
    cells: list[str] = []
    limit: int | None = None
    include_path: str | None = None


class BenchAccuracy(_Record):
    """benchmark.json's `accuracy`: task → metric → value of the dense model and of each accuracy cell."""

    tasks: TaskSetup
    dense: dict[str, dict[str, Any]]
    cells: dict[str, dict[str, dict[str, Any]]]


class BenchSummary(_Record):
    """benchmark.json (copal.bench_report.summarize_grid, plus what the flow adds)."""

    setup: BenchSetup
    notes: BenchNotes
    cost_cells: list[str]
    dense: DenseRow | None
    cells: list[BenchCell]
    missing: list[str]
    quick: bool | None = None
    accuracy: BenchAccuracy | None = None
    runner: str | None = None
