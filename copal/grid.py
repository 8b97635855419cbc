"""The benchmark grid (`copal bench`): which cells it has, each cell's config, and
what is recorded of a cell so far. Pure: no orchestration here (flows/bench.py runs
the cells, on this machine or a cluster) and no reporting (copal/bench_report.py).

Each cell is an ordinary continual run in OUT/cells/<cell-id>, so the grid
resumes as a run does: a cell whose metrics.json covers every domain is
finished, a half-done one continues at its first unrecorded step.

Magnitude pruning uses no calibration data, so its regimes coincide: reprune,
accumulate and joint all score |W0|, and sequential ranks |W0 ⊙ mask|, whose top
weights are exactly the mask it already has. It runs once per structure,
recorded as regime `reprune`.

The cost comparison (seconds and peak RSS per step, per method) comes from cells
run alone, one at a time (`cost_cells`), before the rest of the grid runs in
parallel; every cell also shares the dense model's PPL row, measured once.
"""

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator

from copal.config import (BENCH_CONFIG, MethodName, RegimeName, RunConfig, StructureName, build_config,
                          format_validation_error, load_raw)
from copal.errors import InputError
from copal.masks import STRUCTURES, parse_structure
from copal.methods import METHODS
from copal.options import Strict
from copal.progress import Progress
from copal.records import BenchAccuracy, RunMetrics, TaskSetup
from copal.regimes import REGIMES

log = logging.getLogger("copal")

MAGNITUDE_NOTE = ("magnitude uses no data, so every regime gives the same masks (sequential too: ranking "
                  "|W0 ⊙ mask| keeps the mask); it runs once per structure, as regime reprune")
# Cells whose PPL matrices are drawn: COPAL and the two failure modes it addresses (at 70 % they show).
# COPAL variants of docs/METHOD.md, compared in the accumulate regime. Each says its sensitivity
# and mask, so that it means the same whatever the base config's are (`mask` chooses only for
# sensitivity: hessian; the others record the unused obs).
_FIRST_ORDER = {"sensitivity": "output", "mask": "obs"}
COPAL_VARIANTS = {
    "hessian": {"sensitivity": "hessian", "mask": "obs"},
    "output": _FIRST_ORDER,
    "loss": {"sensitivity": "loss", "mask": "obs"},
    "raw": _FIRST_ORDER | {"normalize": False},
    "max": _FIRST_ORDER | {"reduce": "max"},
    "reconstruct": _FIRST_ORDER | {"reconstruct": True, "refit": "obs"},
    "pcg": _FIRST_ORDER | {"reconstruct": True, "refit": "pcg", "refit_iterations": 20},
    "admm": {"sensitivity": "hessian", "mask": "admm"},
    "owl": {"sensitivity": "hessian", "mask": "obs"},
}
# What a variant changes outside the copal section (unstructured only: OWL has no N:M form).
VARIANT_RUN_SETTINGS = {"owl": {"sparsity_profile": "owl"}}
VARIANT_NOTES = {
    "": "the configured copal section",
    "hessian": "second-order: SparseGPT's OBS mask from the Hessian accumulated across domains, kept weights "
               "refit by conjugate gradient (the default from issue 20's first grid until ADMM's short schedule)",
    "output": "the paper's output sensitivity E|y|·|x|, normalised per domain, summed over domains",
    "loss": "loss-gradient sensitivity Σ|∂L/∂W| instead of the output sensitivity",
    "raw": "output sensitivity with no per-domain normalisation before summing",
    "max": "output sensitivity, elementwise max over domains instead of the sum",
    "reconstruct": "output sensitivity's mask, kept weights reconstructed by SparseGPT's OBS update from the "
                   "accumulated Hessian",
    "pcg": "output sensitivity's mask, kept weights refit by conjugate gradient (ALPS's refit, 20 iterations) from "
           "the accumulated Hessian",
    "admm": "second-order, the mask chosen by ADMM on the accumulated Hessian (ALPS's splitting), kept weights refit "
            "by conjugate gradient from ADMM's own (the default: 4 + 4 iterations)",
    "owl": "second-order, each layer's sparsity allocated by OWL from Σx² accumulated across domains "
           "(sparsity_profile: owl, λ 0.08, M 5)",
}
QUICK_DOMAINS = 3
QUICK_NSAMPLES = 16
QUICK_MAX_TOKENS = 4096
MEMORY_HEADROOM = 0.8  # plan parallel cells within this share of the available memory


@dataclass(frozen=True)
class Cell:
    method: str
    regime: str
    structure: str = "unstructured"
    sparsity: float = 0.5
    variant: str = ""  # a key of COPAL_VARIANTS; "" is the configured default

    @property
    def id(self) -> str:
        shape = (f"u{round(self.sparsity * 100)}" if self.structure == "unstructured"
                 else self.structure.replace(":", "of"))
        return f"{self.method}-{self.regime}-{shape}" + (f"-{self.variant}" if self.variant else "")

    @property
    def label(self) -> str:
        label = "magnitude" if self.method == "magnitude" else f"{self.method}/{self.regime}"
        return label + (f" ({self.variant})" if self.variant else "")


Sparsity = Annotated[float, Field(gt=0, lt=1)]
NMStructure = Literal[tuple(name for name in STRUCTURES if parse_structure(name))]


class Sweep(Strict):
    """Unstructured cells at more sparsities: each method × regime here (magnitude: once, as reprune)."""

    sparsities: list[Sparsity] = [0.6, 0.7]
    methods: list[MethodName] = ["magnitude", "wanda", "copal"]
    regimes: list[RegimeName] = ["sequential", "reprune", "accumulate"]


class Variants(Strict):
    """COPAL/accumulate with one of COPAL_VARIANTS' changes: unstructured at these
    sparsities, and at these N:M structures (none by default)."""

    sparsities: list[Sparsity] = [0.5, 0.7]
    structures: list[NMStructure] = []
    names: list[Literal[tuple(COPAL_VARIANTS)]] = ["loss", "raw", "max"]


class GridTasks(Strict):
    """Downstream accuracy (lm-eval tasks) of the dense model and of the final model of
    these cells; measured once the grid has run, one cell at a time."""

    names: list[str] = []
    cells: list[str] = []
    limit: int | None = Field(None, gt=0)
    include_path: str | None = None


class Resources(Strict):
    """What one cell needs: on a cluster, what the runner reserves for it (a cell never
    lands on a worker without it); everywhere, `cpus` is the cell's torch thread count.

    The same cell gives bit-identical numbers on every runner when it runs with the
    same thread count, which `copal bench` pins on every runner: `cpus` if set; unset, the
    local runner's plan on the submitting machine (every thread of its process for a cell
    run alone, the cores shared among cells run at once), on a cluster too, whatever size
    its workers are (a cell still reserves 1 CPU there)."""

    cpus: int | None = Field(None, ge=1)
    memory_gb: float | None = Field(None, gt=0)
    gpus: float = Field(0, ge=0)


class Grid(Strict):
    """Which cells `copal bench` runs: the `grid:` section of a bench config. The defaults
    are the reference benchmark's grid (configs/bench.yaml has no `grid:` section)."""

    structures: list[StructureName] = list(STRUCTURES)
    # Each a group or a list of groups (e.g. one variant at more sparsities than the others).
    sweep: list[Sweep] = [Sweep()]
    variants: list[Variants] = [Variants()]
    tasks: GridTasks = GridTasks()
    cells: list[str] = []  # only these cells (ids) of the grid; empty: every cell
    resources: Resources = Resources()

    @field_validator("sweep", "variants", mode="before")
    @classmethod
    def _groups(cls, value):
        return [value] if isinstance(value, dict) else value


def full_grid(grid: Grid = Grid()) -> list[Cell]:
    """Every method × regime per structure at 50 % (N:M at its own sparsity), the
    unstructured sparsity sweep, the COPAL variants. Cells run in this order, the 50 %
    setting first: a grid cut short has the paper's main table."""
    cells = []
    for structure in grid.structures:
        cells.append(Cell("magnitude", "reprune", structure))
        cells += [Cell(method, regime, structure) for method in METHODS if method != "magnitude"
                  for regime in REGIMES]
    for sweep in grid.sweep:
        for sparsity in sweep.sparsities:
            if "magnitude" in sweep.methods:
                cells.append(Cell("magnitude", "reprune", "unstructured", sparsity))
            cells += [Cell(method, regime, "unstructured", sparsity) for method in sweep.methods
                      if method != "magnitude" for regime in sweep.regimes]
    for variants in grid.variants:
        cells += [Cell("copal", "accumulate", "unstructured", sparsity, variant) for sparsity in variants.sparsities
                  for variant in variants.names]
        cells += [Cell("copal", "accumulate", structure, 0.5, variant) for structure in variants.structures
                  for variant in variants.names]
    return list(dict.fromkeys(cells))


def load_bench_config(path: Path | None) -> tuple[RunConfig, Grid]:
    """A bench config: a run config (each cell's base) plus an optional `grid:` section."""
    raw = load_raw(path, default=BENCH_CONFIG)
    source = str(path or BENCH_CONFIG)
    try:
        grid = Grid.model_validate(raw.pop("grid", None) or {})
    except ValidationError as error:
        raise InputError(format_validation_error(error, f"{source}: grid")) from None
    return build_config(raw, source), grid


def plan(config_path: Path | None, quick: bool) -> tuple[RunConfig, Grid, list[Cell]]:
    """The base config, the grid section and the cells `copal bench [--quick]` runs, checked.
    --quick keeps the grid section's `cells` and `resources`, nothing else of it."""
    base, grid = load_bench_config(config_path)
    cells = quick_grid() if quick else full_grid(grid)
    if quick:
        base, grid = quick_config(base), Grid(cells=grid.cells, resources=grid.resources)
    check_task_cells(grid.tasks, cells)  # the whole grid's: `cells` may narrow the run, not the accuracy list
    if grid.cells:
        unknown = sorted(set(grid.cells) - {cell.id for cell in cells})
        if unknown:
            raise InputError(f"grid.cells: {', '.join(unknown)} not in this grid "
                             f"(its cells: {', '.join(cell.id for cell in cells)})")
        cells = [cell for cell in cells if cell.id in grid.cells]
    return base, grid, cells


def default_out(quick: bool) -> Path:
    return Path("reports/quick") if quick else Path("reports")


def quick_grid() -> list[Cell]:
    """A smoke test of the benchmark: one continual baseline per data-driven method, and COPAL."""
    return [Cell("wanda", "reprune"), Cell("sparsegpt", "reprune"), Cell("copal", "accumulate")]


def cost_cells(cells: list[Cell]) -> list[Cell]:
    """Per method, its default 50 % unstructured cell in the accumulate regime, else
    reprune (magnitude has only reprune; the quick grid has wanda and sparsegpt only
    in reprune): the cells whose timings compare the methods."""
    present = set(cells)
    chosen = []
    for method in METHODS:
        for regime in ("accumulate", "reprune"):
            if Cell(method, regime) in present:
                chosen.append(Cell(method, regime))
                break
    return chosen


def quick_config(base: RunConfig) -> RunConfig:
    """Fewer domains, calibration samples and evaluation tokens (never more than the base has)."""
    raw = base.model_dump()
    raw["domains"] = raw["domains"][:QUICK_DOMAINS]
    raw["calibration"]["nsamples"] = min(raw["calibration"]["nsamples"], QUICK_NSAMPLES)
    raw["evaluation"]["max_tokens"] = max(raw["evaluation"]["seqlen"],
                                          min(raw["evaluation"]["max_tokens"], QUICK_MAX_TOKENS))
    return build_config(raw, "quick benchmark config")


def cell_config(base: RunConfig, cell: Cell) -> RunConfig:
    raw = base.model_dump() | {"name": cell.id, "method": cell.method, "regime": cell.regime,
                               "structure": cell.structure, "sparsity": cell.sparsity}
    if cell.variant:
        raw["copal"] = raw["copal"] | COPAL_VARIANTS[cell.variant]
        raw |= VARIANT_RUN_SETTINGS.get(cell.variant, {})
    return build_config(raw, f"benchmark cell {cell.id}")


def cell_dir(out_dir: Path, cell: Cell) -> Path:
    return Path(out_dir) / "cells" / cell.id


def cell_metrics(out_dir: Path, cell: Cell) -> RunMetrics | None:
    """What the cell's metrics.json holds (None: none yet, or unreadable: the cell runs again)."""
    try:
        return RunMetrics.model_validate(json.loads((cell_dir(out_dir, cell) / "metrics.json").read_text()))
    except (OSError, ValueError):  # a ValidationError is a ValueError
        return None


def is_finished(out_dir: Path, cell: Cell, domains: int) -> bool:
    metrics = cell_metrics(out_dir, cell)
    return metrics is not None and len(metrics.steps) >= domains


def available_memory_mb() -> float:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20


def measured_peak_mb(out_dir: Path, cells: list[Cell]) -> float | None:
    """The highest per-step peak RSS any of these cells has recorded so far."""
    recorded = [cell_metrics(out_dir, cell) for cell in cells]
    peaks = [step.peak_rss_mb for metrics in recorded if metrics for step in metrics.steps
             if step.peak_rss_mb is not None]
    return max(peaks, default=None)


def default_jobs(peak_mb: float, available_mb: float, cores: int) -> int:
    """As many cells at once as fit in memory (with headroom), at most one per core."""
    return max(1, min(cores, int(MEMORY_HEADROOM * available_mb // max(peak_mb, 1.0))))


def shared_dense(out_dir: Path, cells: list[Cell], base: RunConfig, fingerprints: dict[str, str]) -> dict | None:
    """The dense PPL row a cell of this grid has already measured, if one was
    measured with this model, dtype, evaluation setting and data."""
    from copal.rundir import RunDir
    from copal.state import read_json

    for cell in cells:
        run = RunDir(cell_dir(out_dir, cell))
        if not (run.exists() and run.dense_path.exists()):
            continue
        try:
            config, recorded = run.read_config()
            dense = read_json(run.dense_path, "dense PPLs")
        except InputError:
            continue
        same_setup = (config.model, config.dtype, config.evaluation) == (base.model, base.dtype, base.evaluation)
        if same_setup and all(recorded.get(name) == fp for name, fp in fingerprints.items()):
            return dense
    return None


def run_cell(config: RunConfig, root: Path, data_dir: Path | None, threads: int | None,
             progress: Progress | None = None, known_dense: dict | None = None) -> Path:
    """One cell, to the end of its domain sequence (resuming what is recorded), in this
    process with `threads` torch threads (None: as the process has them); its directory.
    The process's allocator settings are its entry point's (flows/bench.py's cell task)."""
    from copal.continual import ContinualRun
    from copal.model import torch_threads

    with torch_threads(threads):  # restored: a cell may run in the caller's process
        ContinualRun(config, root, progress=progress, data_dir=data_dir, known_dense=known_dense).run()
    return Path(root)


def check_task_cells(tasks: GridTasks, cells: list[Cell]) -> None:
    """Before any cell runs: the accuracy cells are cells of this grid, the tasks exist."""
    unknown = sorted(set(tasks.cells) - {cell.id for cell in cells})
    if unknown:
        raise InputError(f"grid.tasks.cells: {', '.join(unknown)} not in this grid "
                         f"(its cells: {', '.join(cell.id for cell in cells)})")
    if tasks.cells and not tasks.names:
        raise InputError("grid.tasks.cells is set but grid.tasks.names is empty")
    if tasks.names:
        from copal.lm_eval_tasks import check_tasks

        check_tasks(tasks.names, tasks.include_path)


def _accuracy(path: Path, tasks: GridTasks, device: str, load, measure: bool = True) -> dict | None:
    """lm-eval accuracies of the model `load()` gives, kept in `path` (measured once;
    measure=False: only what is recorded, else None)."""
    from copal.model import resolve_device
    from copal.state import read_json, write_json
    from copal.lm_eval_tasks import task_accuracy

    if path.exists():
        recorded = read_json(path, "task accuracies")
        if recorded.get("setup") == tasks.model_dump():
            return recorded["tasks"]
    if not measure:
        return None
    model, tokenizer = load()
    measured = task_accuracy(model, tokenizer, tasks.names, tasks.include_path, resolve_device(device),
                             limit=tasks.limit)
    write_json(path, {"setup": tasks.model_dump(), "tasks": measured})
    return measured


def grid_accuracy(base: RunConfig, tasks: GridTasks, cells: list[Cell], out_dir: Path,
                  progress: Progress | None = None, measure: bool = True) -> BenchAccuracy | None:
    """The dense model's and each finished accuracy cell's final model's task accuracies
    (None: the grid has no tasks).
    Each is kept in OUT/tasks/<id>.json, so a resumed grid measures only what is missing;
    measure=False reports what is recorded and measures nothing (None: not even the dense model's)."""
    if not tasks.names:
        return None
    from copal.rundir import RunDir
    from copal.export import load_step_model
    from copal.model import load_model

    progress = progress or (lambda what, done, total: None)
    folder = Path(out_dir) / "tasks"  # written (atomically, parents made) only when something is measured
    chosen = [cell for cell in cells if cell.id in tasks.cells and is_finished(out_dir, cell, len(base.domains))]
    progress("task accuracy", 0, len(chosen) + 1)
    dense = _accuracy(folder / "dense.json", tasks, base.device,
                      lambda: load_model(base.model, base.dtype, base.trust_remote_code), measure)
    if dense is None:
        return None
    results = {}
    for index, cell in enumerate(chosen, 1):
        progress("task accuracy", index, len(chosen) + 1)
        root = cell_dir(out_dir, cell)
        result = _accuracy(folder / f"{cell.id}.json", tasks, base.device,
                           lambda: load_step_model(root, RunDir(root).head(), base.trust_remote_code), measure)
        if result is not None:
            results[cell.id] = result
    progress("task accuracy", len(chosen) + 1, len(chosen) + 1)
    return BenchAccuracy(tasks=TaskSetup.model_validate(tasks.model_dump()), dense=dense, cells=results)


