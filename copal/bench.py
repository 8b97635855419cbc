"""The benchmark grid: methods × regimes × structures on one domain sequence (`copal bench`).

Each cell is an ordinary continual run in OUT/cells/<cell-id>, so the grid
resumes as a run does: a cell whose metrics.json covers every domain is skipped,
a half-done one continues at its first unrecorded step. Cells run in separate
processes, as many at once as memory allows.

Magnitude pruning uses no calibration data, so its regimes coincide: reprune,
accumulate and joint all score |W0|, and sequential ranks |W0 ⊙ mask|, whose top
weights are exactly the mask it already has. It runs once per structure,
recorded as regime `reprune`.

The cost comparison (seconds and peak RSS per step, per method) comes from cells
run alone, one at a time with every core, before the rest of the grid runs in
parallel; every cell also shares the dense model's PPL row, measured once.
"""

import json
import logging
import multiprocessing
import os
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from copal import plots
from copal.atomic import write_atomic
from copal.config import (BENCH_CONFIG, METHODS, REGIMES, STRUCTURES, RunConfig, build_config,
                          format_validation_error, load_raw)
from copal.errors import InputError

log = logging.getLogger("copal")

Progress = Callable[[str, int, int], None]

MAGNITUDE_NOTE = ("magnitude uses no data, so every regime gives the same masks (sequential too: ranking "
                  "|W0 ⊙ mask| keeps the mask); it runs once per structure, as regime reprune")
# Cells whose PPL matrices are drawn: COPAL and the two failure modes it addresses (at 70 % they show).
KEY_CELLS = ("copal-accumulate-u50", "wanda-sequential-u50", "wanda-reprune-u50", "wanda-accumulate-u50",
             "sparsegpt-accumulate-u50", "copal-accumulate-u70", "wanda-sequential-u70", "wanda-reprune-u70")
# COPAL variants of METHOD.md, each one change from the default, compared in the
# accumulate regime at these sparsities.
COPAL_VARIANTS = {
    "loss": {"sensitivity": "loss"},
    "raw": {"normalize": False},
    "max": {"reduce": "max"},
}
VARIANT_NOTES = {
    "": "output sensitivity E|y|·|x|, normalised per domain, summed over domains",
    "loss": "loss-gradient sensitivity Σ|∂L/∂W| instead of the output sensitivity",
    "raw": "no per-domain normalisation of the statistic before summing",
    "max": "elementwise max over domains instead of the sum",
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


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Sparsity = Annotated[float, Field(gt=0, lt=1)]


class Sweep(_Strict):
    """Unstructured cells at more sparsities: each method × regime here (magnitude: once, as reprune)."""

    sparsities: list[Sparsity] = [0.6, 0.7]
    methods: list[Literal["magnitude", "wanda", "sparsegpt", "copal"]] = ["magnitude", "wanda", "copal"]
    regimes: list[Literal["sequential", "reprune", "accumulate", "joint"]] = ["sequential", "reprune", "accumulate"]


class Variants(_Strict):
    """COPAL/accumulate, unstructured, with one of COPAL_VARIANTS' changes, at these sparsities."""

    sparsities: list[Sparsity] = [0.5, 0.7]
    names: list[Literal["loss", "raw", "max"]] = ["loss", "raw", "max"]


class GridTasks(_Strict):
    """Downstream accuracy (lm-eval tasks) of the dense model and of the final model of
    these cells; measured once the grid has run, one cell at a time."""

    names: list[str] = []
    cells: list[str] = []
    limit: int | None = Field(None, gt=0)
    include_path: str | None = None


class Grid(_Strict):
    """Which cells `copal bench` runs: the `grid:` section of a bench config. The defaults
    are the reference benchmark's grid (configs/bench.yaml has no `grid:` section)."""

    structures: list[Literal["unstructured", "2:4", "4:8"]] = list(STRUCTURES)
    sweep: Sweep = Sweep()
    variants: Variants = Variants()
    tasks: GridTasks = GridTasks()


def full_grid(grid: Grid = Grid()) -> list[Cell]:
    """Every method × regime per structure at 50 % (N:M at its own sparsity), the
    unstructured sparsity sweep, the COPAL variants. Cells run in this order, the 50 %
    setting first: a grid cut short has the paper's main table."""
    cells = []
    for structure in grid.structures:
        cells.append(Cell("magnitude", "reprune", structure))
        cells += [Cell(method, regime, structure) for method in METHODS if method != "magnitude"
                  for regime in REGIMES]
    for sparsity in grid.sweep.sparsities:
        if "magnitude" in grid.sweep.methods:
            cells.append(Cell("magnitude", "reprune", "unstructured", sparsity))
        cells += [Cell(method, regime, "unstructured", sparsity) for method in grid.sweep.methods
                  if method != "magnitude" for regime in grid.sweep.regimes]
    cells += [Cell("copal", "accumulate", "unstructured", sparsity, variant) for sparsity in grid.variants.sparsities
              for variant in grid.variants.names]
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
    return build_config(raw, f"benchmark cell {cell.id}")


def cell_dir(out_dir: Path, cell: Cell) -> Path:
    return Path(out_dir) / "cells" / cell.id


def _cell_metrics(out_dir: Path, cell: Cell) -> dict | None:
    try:
        return json.loads((cell_dir(out_dir, cell) / "metrics.json").read_text())
    except (OSError, ValueError):
        return None


def is_finished(out_dir: Path, cell: Cell, domains: int) -> bool:
    metrics = _cell_metrics(out_dir, cell)
    return bool(metrics) and len(metrics.get("steps", [])) >= domains


# ----------------------------------------------------------------------------- running cells


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
    peaks = [step["peak_rss_mb"] for cell in cells for step in (_cell_metrics(out_dir, cell) or {}).get("steps", [])]
    return max(peaks, default=None)


def default_jobs(peak_mb: float, available_mb: float, cores: int) -> int:
    """As many cells at once as fit in memory (with headroom), at most one per core."""
    return max(1, min(cores, int(MEMORY_HEADROOM * available_mb // max(peak_mb, 1.0))))


def shared_dense(out_dir: Path, cells: list[Cell], base: RunConfig, fingerprints: dict[str, str]) -> dict | None:
    """The dense PPL row a cell of this grid has already measured, if one was
    measured with this model, dtype, evaluation setting and data."""
    from copal.continual import RunDir
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


def _run_cell(config: RunConfig, root: Path, data_dir: Path | None, threads: int | None,
              progress: Progress | None = None, known_dense: dict | None = None) -> None:
    """One cell, to the end of its domain sequence (resuming what is recorded)."""
    import torch

    from copal.continual import ContinualRun
    from copal.metrics import limit_allocator_fragmentation

    limit_allocator_fragmentation()
    if threads:
        torch.set_num_threads(threads)
    ContinualRun(config, root, progress=progress, data_dir=data_dir, known_dense=known_dense).run()


def run_grid(base: RunConfig, cells: list[Cell], out_dir: Path, jobs: int | None = None,
             data_dir: Path | None = None, progress: Progress | None = None,
             alone: list[Cell] = ()) -> dict[str, Exception]:
    """Run every unfinished cell; returns {cell id: error} for the cells that failed.

    The `alone` cells run first, one at a time in this process, so that their
    timings are not shared with other cells. jobs=None then sizes the pool from
    the per-cell peak RSS recorded under `out_dir` (running one more cell alone
    first when nothing is recorded yet). jobs=1 runs every cell in this process."""
    from copal.data import ingest

    progress = progress or (lambda what, done, total: None)
    fingerprints = {}
    for spec in base.domains:  # bad data fails here, once; parallel cells then find the Arrow cache warm
        domain = ingest(spec, data_dir)
        fingerprints[domain.name] = domain.fingerprint
    configs = {cell.id: cell_config(base, cell) for cell in cells}
    pending = [cell for cell in cells if not is_finished(out_dir, cell, len(base.domains))]
    done = len(cells) - len(pending)
    if done:
        log.info("%d of %d cells already finished; skipped", done, len(cells))
    progress("cells", done, len(cells))
    failures: dict[str, Exception] = {}

    def finished(cell: Cell, error: Exception | None) -> None:
        nonlocal done
        done += 1
        progress("cells", done, len(cells))
        if error is None:
            log.info("cell %s finished (%d/%d)", cell.id, done, len(cells))
        else:
            failures[cell.id] = error
            log.error("cell %s failed: %s", cell.id, error,
                      exc_info=None if isinstance(error, InputError) else error)

    def run_here(cell: Cell) -> None:
        try:
            _run_cell(configs[cell.id], cell_dir(out_dir, cell), data_dir, None, progress,
                      shared_dense(out_dir, cells, base, fingerprints))
        except Exception as error:  # one broken cell must not cost the others
            finished(cell, error)
        else:
            finished(cell, None)

    first = [cell for cell in alone if cell in pending]
    if jobs is None and not first and pending and measured_peak_mb(out_dir, cells) is None:
        first = pending[:1]
    for cell in first:
        run_here(cell)
    pending = [cell for cell in pending if cell not in first]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if jobs is None and pending:
        peak = measured_peak_mb(out_dir, cells)
        jobs = default_jobs(peak, available_memory_mb(), cores) if peak else 1
        log.info("per-cell peak RSS %s MB: running %d cell(s) at a time", f"{peak:.0f}" if peak else "?", jobs)
    if jobs == 1 or len(pending) <= 1:
        for cell in pending:
            run_here(cell)
        return failures
    workers = min(jobs, len(pending))
    threads = max(1, cores // workers)
    dense = shared_dense(out_dir, cells, base, fingerprints)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_cell, configs[cell.id], cell_dir(out_dir, cell), data_dir, threads,
                               None, dense): cell for cell in pending}
        for future in as_completed(futures):
            finished(futures[future], future.exception())
    return failures


def check_task_cells(tasks: GridTasks, cells: list[Cell]) -> None:
    """Before any cell runs: the accuracy cells are cells of this grid, the tasks exist."""
    unknown = sorted(set(tasks.cells) - {cell.id for cell in cells})
    if unknown:
        raise InputError(f"grid.tasks.cells: {', '.join(unknown)} not in this grid "
                         f"(its cells: {', '.join(cell.id for cell in cells)})")
    if tasks.cells and not tasks.names:
        raise InputError("grid.tasks.cells is set but grid.tasks.names is empty")
    if tasks.names:
        from copal.tasks import check_tasks

        check_tasks(tasks.names, tasks.include_path)


def _accuracy(path: Path, tasks: GridTasks, device: str, load) -> dict:
    """lm-eval accuracies of the model `load()` gives, kept in `path` (measured once)."""
    from copal.model import resolve_device
    from copal.state import read_json, write_json
    from copal.tasks import task_accuracy

    if path.exists():
        recorded = read_json(path, "task accuracies")
        if recorded.get("setup") == tasks.model_dump():
            return recorded["tasks"]
    model, tokenizer = load()
    measured = task_accuracy(model, tokenizer, tasks.names, tasks.include_path, resolve_device(device),
                             limit=tasks.limit)
    write_json(path, {"setup": tasks.model_dump(), "tasks": measured})
    return measured


def grid_accuracy(base: RunConfig, tasks: GridTasks, cells: list[Cell], out_dir: Path,
                  progress: Progress | None = None) -> dict | None:
    """{"dense": {task: {metric: value}}, "cells": {cell id: …}}: the dense model's and each
    finished accuracy cell's final model's task accuracies (None: the grid has no tasks).
    Each is kept in OUT/tasks/<id>.json, so a resumed grid measures only what is missing."""
    if not tasks.names:
        return None
    from copal.continual import RunDir
    from copal.export import load_step_model
    from copal.model import load_model

    progress = progress or (lambda what, done, total: None)
    folder = Path(out_dir) / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    chosen = [cell for cell in cells if cell.id in tasks.cells and is_finished(out_dir, cell, len(base.domains))]
    progress("task accuracy", 0, len(chosen) + 1)
    dense = _accuracy(folder / "dense.json", tasks, base.device,
                      lambda: load_model(base.model, base.dtype, base.trust_remote_code))
    results = {}
    for index, cell in enumerate(chosen, 1):
        progress("task accuracy", index, len(chosen) + 1)
        root = cell_dir(out_dir, cell)
        results[cell.id] = _accuracy(folder / f"{cell.id}.json", tasks, base.device,
                                     lambda: load_step_model(root, RunDir(root).head()))
    progress("task accuracy", len(chosen) + 1, len(chosen) + 1)
    return {"tasks": tasks.model_dump(), "dense": dense, "cells": results}


# ----------------------------------------------------------------------------- results


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def summarize_grid(base: RunConfig, cells: list[Cell], out_dir: Path) -> dict:
    """benchmark.json: the shared setup, the dense row, and every finished cell's metrics."""
    results, missing = [], []
    for cell in cells:
        if not is_finished(out_dir, cell, len(base.domains)):
            missing.append(cell.id)
            continue
        metrics = _cell_metrics(out_dir, cell)
        config = cell_config(base, cell)
        options = {"copal": config.copal.model_dump(), "sparsegpt": config.sparsegpt.model_dump()}
        results.append({
            "id": cell.id, "label": cell.label, "method": cell.method, "regime": cell.regime,
            "structure": cell.structure, "sparsity": cell.sparsity, "variant": cell.variant,
            "options": options.get(cell.method, {}),
            "domains": metrics["domains"], "dense_ppl": metrics["dense_ppl"], "ppl": metrics["ppl"],
            "bwt": metrics["bwt"], "avg_ppl": metrics["avg_ppl"], "steps": metrics["steps"],
        })
    dense = None
    if results:
        dense = {"domains": results[0]["domains"], "ppl": results[0]["dense_ppl"],
                 "avg_ppl": _mean(results[0]["dense_ppl"])}
    return {
        "setup": {"model": base.model, "domains": base.domains, "calibration": base.calibration.model_dump(),
                  "evaluation": base.evaluation.model_dump(), "dtype": base.dtype},
        "notes": {"magnitude": MAGNITUDE_NOTE, "variants": VARIANT_NOTES},
        "cost_cells": [cell.id for cell in cost_cells(cells)],
        "dense": dense, "cells": results, "missing": missing,
    }


def _by_id(summary: dict) -> dict[str, dict]:
    return {cell["id"]: cell for cell in summary["cells"]}


def _rows(cells: list[dict]) -> list[tuple[str, str]]:
    """(method, regime) pairs present, in the canonical method and regime order."""
    present = {(cell["method"], cell["regime"]) for cell in cells}
    return [(m, r) for m in METHODS for r in REGIMES if (m, r) in present]


def _structure_label(structure: str, sparsity: float) -> str:
    return f"{round(sparsity * 100)} % unstructured" if structure == "unstructured" else structure


def _metric_table(summary: dict, columns: list[tuple[str, float]]) -> list[str]:
    """Rows method/regime; per (structure, sparsity) column pair: average PPL and BWT."""
    wanted = [c for c in summary["cells"] if (c["structure"], c["sparsity"]) in columns and not c["variant"]]
    lookup = {(c["method"], c["regime"], c["structure"], c["sparsity"]): c for c in wanted}
    head = ["method", "regime"]
    for structure, sparsity in columns:
        label = _structure_label(structure, sparsity)
        head += [f"{label} avg PPL", f"{label} BWT"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    if summary["dense"]:
        dense = plots.format_value(summary["dense"]["avg_ppl"])
        lines.append("| dense | – |" + f" {dense} | – |" * len(columns))
    for method, regime in _rows(wanted):
        row = [method, "any¹" if method == "magnitude" else regime]
        for structure, sparsity in columns:
            cell = lookup.get((method, regime, structure, sparsity))
            row += [plots.format_value(cell["avg_ppl"]), plots.format_value(cell["bwt"])] if cell else ["", ""]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _ablation_table(summary: dict) -> list[str]:
    """COPAL/accumulate per variant: average PPL, BWT and pruning seconds per sparsity."""
    variants = [c for c in summary["cells"] if c["method"] == "copal" and c["regime"] == "accumulate"
                and c["structure"] == "unstructured"]
    sparsities = sorted({c["sparsity"] for c in variants if c["variant"]})
    if not sparsities:
        return []
    lookup = {(c["variant"], c["sparsity"]): c for c in variants}
    alone = set(summary["cost_cells"])
    head = ["variant", "what changes"]
    for sparsity in sparsities:
        head += [f"{round(sparsity * 100)} % avg PPL", f"{round(sparsity * 100)} % BWT",
                 f"{round(sparsity * 100)} % pruning s/step"]
    lines = ["## COPAL variants (accumulate, unstructured)", "",
             "| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for variant, note in summary["notes"]["variants"].items():
        row = [variant or "default", note.replace("|", "\\|")]
        for sparsity in sparsities:
            cell = lookup.get((variant, sparsity))
            if cell is None:
                row += ["", "", ""]
                continue
            mark = "²" if cell["id"] in alone else ""
            row += [plots.format_value(cell["avg_ppl"]), plots.format_value(cell["bwt"]),
                    f"{_cost(cell)['prune_seconds']:.2f}{mark}"]
        lines.append("| " + " | ".join(row) + " |")
    if any(cell["id"] in alone for cell in variants):
        lines += ["", "² ran alone, as a cost cell; the other cells of the grid ran two at a time, so their "
                      "seconds compare with each other, not with this one."]
    return lines + [""]


def _cost(cell: dict) -> dict:
    steps = cell["steps"]
    return {"seconds": _mean([s["seconds"] for s in steps]),
            "prune_seconds": _mean([s["prune_seconds"] for s in steps]),
            "peak_rss_mb": max(s["peak_rss_mb"] for s in steps)}


def _cost_section(summary: dict) -> list[str]:
    cells = _by_id(summary)
    chosen = [cells[cell_id] for cell_id in summary["cost_cells"] if cell_id in cells]
    if not chosen:
        return []
    lines = ["## Cost per step (50 % unstructured; accumulate, else reprune)", "",
             "These cells ran alone, one at a time with every core, before the rest of the grid; a step is "
             "calibration, the pruning pass and the evaluation.", "",
             "| method | regime | mean s/step | mean pruning s/step | peak RSS MB |", "|---|---|---:|---:|---:|"]
    costs = {cell["method"]: _cost(cell) for cell in chosen}
    for cell in chosen:
        cost = costs[cell["method"]]
        lines.append(f"| {cell['method']} | {cell['regime']} | {cost['seconds']:.1f} | {cost['prune_seconds']:.2f} "
                     f"| {cost['peak_rss_mb']:.0f} |")
    lines.append("")
    if "copal" in costs:
        for other in ("wanda", "sparsegpt"):
            if other in costs:
                prune = costs["copal"]["prune_seconds"] / costs[other]["prune_seconds"]
                whole = costs["copal"]["seconds"] / costs[other]["seconds"]
                met = prune <= 2.0 if other == "wanda" else prune < 1.0
                target = "at most 2×" if other == "wanda" else "below 1×"
                lines.append(f"- copal's pruning time is {prune:.2f}× {other}'s "
                             f"({whole:.2f}× for the whole step, evaluation included); target {target}: "
                             f"{_verdict(met)}.")
        lines.append("")
    return lines


CONTINUAL_BASELINES = [(m, r) for m in ("wanda", "sparsegpt") for r in ("sequential", "reprune", "accumulate")]
BWT_TARGET = 0.10  # copal/accumulate's BWT at most this share of wanda/reprune's


def _verdict(met: bool | None) -> str:
    return "–" if met is None else ("met" if met else "**missed**")


def _targets_section(summary: dict) -> list[str]:
    """The benchmark's targets, checked per setting from the recorded cells."""
    lookup = {(c["method"], c["regime"], c["structure"], c["sparsity"]): c
              for c in summary["cells"] if not c["variant"]}
    settings = sorted({(c["structure"], c["sparsity"]) for c in summary["cells"]},
                      key=lambda s: (STRUCTURES.index(s[0]), s[1]))
    lines = ["## Targets", "",
             f"copal/accumulate against wanda/reprune's BWT (target: at most {BWT_TARGET:.0%} of it) and against "
             "the best continual baseline's average PPL (wanda and sparsegpt in sequential, reprune, accumulate; "
             "target: no worse).", "",
             "| setting | copal BWT | wanda/reprune BWT | ratio | BWT target | copal avg PPL | best baseline "
             "| its avg PPL | PPL target |", "|---|---:|---:|---:|---|---:|---|---:|---|"]
    fmt = plots.format_value
    for structure, sparsity in settings:
        copal = lookup.get(("copal", "accumulate", structure, sparsity))
        wanda = lookup.get(("wanda", "reprune", structure, sparsity))
        if not copal:
            continue
        ratio, bwt_met = None, None
        if wanda and copal["bwt"] is not None and wanda["bwt"] is not None:
            bwt_met = copal["bwt"] <= BWT_TARGET * wanda["bwt"] if wanda["bwt"] > 0 else copal["bwt"] <= wanda["bwt"]
            ratio = copal["bwt"] / wanda["bwt"] if wanda["bwt"] > 0 else None
        baselines = [lookup[(m, r, structure, sparsity)] for m, r in CONTINUAL_BASELINES
                     if (m, r, structure, sparsity) in lookup]
        best = min(baselines, key=lambda c: c["avg_ppl"]) if baselines else None
        ppl_met = copal["avg_ppl"] <= best["avg_ppl"] if best else None
        lines.append(f"| {_structure_label(structure, sparsity)} | {fmt(copal['bwt'])} | "
                     f"{fmt(wanda['bwt']) if wanda else '–'} | {f'{ratio:.2f}' if ratio is not None else '–'} | "
                     f"{_verdict(bwt_met)} | {fmt(copal['avg_ppl'])} | {best['label'] if best else '–'} | "
                     f"{fmt(best['avg_ppl']) if best else '–'} | {_verdict(ppl_met)} |")
    lines.append("")
    for structure, sparsity in settings:
        magnitude = lookup.get(("magnitude", "reprune", structure, sparsity))
        others = [lookup.get((m, r, structure, sparsity)) for m in ("wanda", "sparsegpt")
                  for r in ("reprune", "accumulate")]
        ratios = [f"{magnitude['avg_ppl'] / other['avg_ppl']:.2f}× {other['label']}'s"
                  for other in others if magnitude and other]
        if ratios:
            lines.append(f"- {_structure_label(structure, sparsity)}: magnitude's average PPL is "
                         + ", ".join(ratios) + ".")
    return lines + [""]


def _accuracy_section(summary: dict) -> list[str]:
    """Dense vs each accuracy cell's final model on the grid's lm-eval tasks (accuracy ± stderr)."""
    accuracy = summary.get("accuracy")
    if not accuracy:
        return []
    names = accuracy["tasks"]["names"]
    limit = accuracy["tasks"]["limit"]
    labels = {cell["id"]: cell["label"] + f", {_structure_label(cell['structure'], cell['sparsity'])}"
              for cell in summary["cells"]}

    def row(label: str, result: dict) -> str:
        values = [f"{100 * result[name]['acc']:.1f} ± {100 * result[name].get('acc_stderr', 0):.1f}"
                  if name in result and "acc" in result[name] else "" for name in names]
        return f"| {label} | " + " | ".join(values) + " |"

    lines = ["## Downstream accuracy after the last step", "",
             f"lm-eval zero-shot accuracy in % ({f'the first {limit} items' if limit else 'every item'} of each "
             "task; ± is lm-eval's standard error).", "",
             "| model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names),
             row("dense", accuracy["dense"])]
    lines += [row(labels.get(cell_id, cell_id), result) for cell_id, result in accuracy["cells"].items()]
    return lines + [""]


def write_markdown(summary: dict, plot_files: list[str] = ()) -> str:
    """benchmark.md: the paper-style table, the sparsity sweep, the cost table, links to the plots."""
    setup = summary["setup"]
    names = summary["dense"]["domains"] if summary["dense"] else setup["domains"]
    calibration, evaluation = setup["calibration"], setup["evaluation"]
    lines = [
        "# Continual pruning benchmark", "",
        f"Model `{setup['model']}`, domains {' → '.join(names)}; calibration {calibration['nsamples']} × "
        f"{calibration['seqlen']} tokens per domain (seed {calibration['seed']}); evaluation on at most "
        f"{evaluation['max_tokens']} tokens per domain in windows of {evaluation['seqlen']}.", "",
        "avg PPL: mean perplexity of the final model over all domains. BWT: mean change of perplexity on each "
        "earlier domain from the step that calibrated on it to the end (negative: it improved). Lower is better "
        "for both. `joint` keeps every domain's data: an upper reference, not a continual method.", "",
        "## Average PPL and BWT after the last step, 50 % sparsity", "",
    ]
    main = [(s, 0.5) for s in STRUCTURES if any(c["structure"] == s and c["sparsity"] == 0.5
                                                 for c in summary["cells"])]
    lines += _metric_table(summary, main) + [""]
    swept = {(c["method"], c["regime"]) for c in summary["cells"] if c["sparsity"] != 0.5}
    if swept:
        sweep = sorted({c["sparsity"] for c in summary["cells"] if c["structure"] == "unstructured"})
        lines += ["## Sparsity sweep, unstructured", ""]
        only_swept = summary | {"cells": [c for c in summary["cells"] if (c["method"], c["regime"]) in swept]}
        lines += _metric_table(only_swept, [("unstructured", s) for s in sweep]) + [""]
    lines += _targets_section(summary)
    lines += _accuracy_section(summary)
    lines += _ablation_table(summary)
    lines += _cost_section(summary)
    if any(cell["method"] == "magnitude" for cell in summary["cells"]):
        lines += [f"¹ {summary['notes']['magnitude']}.", ""]
    lines += [f"![{Path(name).stem}]({name})" for name in plot_files]
    if summary["missing"]:
        lines += ["", f"Not yet run ({len(summary['missing'])}): " + ", ".join(summary["missing"]) + "."]
    return "\n".join(lines) + "\n"


def write_plots(summary: dict, out_dir: Path) -> list[Path]:
    """PPL-matrix heat maps of the key cells, and BWT / average-PPL bars at 50 % sparsity."""
    written = []
    cells = _by_id(summary)
    for cell_id in KEY_CELLS:
        cell = cells.get(cell_id)
        if cell:
            rows = [f"{step['step']}: {step['domain']}" for step in cell["steps"]]
            image = plots.ppl_heatmap([cell["dense_ppl"], *cell["ppl"]], ["dense", *rows], cell["domains"],
                                      f"{cell['label']}, {_structure_label(cell['structure'], cell['sparsity'])}")
            written.append(write_atomic(Path(out_dir) / f"ppl_matrix-{cell_id}.png", image))
    half = [c for c in summary["cells"] if c["sparsity"] == 0.5 and not c["variant"]]
    if not half:
        return written
    groups = list(dict.fromkeys(c["label"] for c in sorted(half, key=lambda c: (METHODS.index(c["method"]),
                                                                                REGIMES.index(c["regime"])))))
    structures = [s for s in STRUCTURES if any(c["structure"] == s for c in half)]
    lookup = {(c["label"], c["structure"]): c for c in half}

    def series(key: str) -> dict[str, list]:
        return {s: [lookup[(g, s)][key] if (g, s) in lookup else None for g in groups] for s in structures}

    averages = [v for values in series("avg_ppl").values() for v in values if v]
    dense = summary["dense"]["avg_ppl"] if summary["dense"] else None
    wide = averages and max(averages) > 10 * min(averages + ([dense] if dense else []))
    written.append(write_atomic(Path(out_dir) / "avg_ppl.png", plots.grouped_bars(
        groups, series("avg_ppl"), "Average PPL after the last step (50 % sparsity)", "perplexity",
        ("dense", dense) if dense else None, log=bool(wide))))
    written.append(write_atomic(Path(out_dir) / "bwt.png", plots.grouped_bars(
        groups, series("bwt"), "BWT after the last step (50 % sparsity)", "BWT (PPL points)")))
    return written


def default_out(quick: bool) -> Path:
    return Path("reports/quick") if quick else Path("reports")


def run_benchmark(config_path: Path | None = None, out_dir: Path | None = None, quick: bool = False,
                  jobs: int | None = None, data_dir: Path | None = None,
                  progress: Progress | None = None) -> tuple[dict, list[Path]]:
    """The whole benchmark: run (or resume) the grid, then write JSON, Markdown and plots.

    Failed cells are left out of the outputs (listed as missing) and reported
    once everything else is written."""
    if jobs is not None and jobs < 1:
        raise InputError(f"--jobs {jobs}: must be at least 1")
    out_dir = Path(out_dir) if out_dir else default_out(quick)
    base, grid = load_bench_config(config_path)
    cells = quick_grid() if quick else full_grid(grid)
    if quick:
        base, grid = quick_config(base), Grid()
    check_task_cells(grid.tasks, cells)
    failures = run_grid(base, cells, out_dir, jobs, data_dir, progress, alone=cost_cells(cells))
    accuracy = grid_accuracy(base, grid.tasks, cells, out_dir, progress)
    summary = summarize_grid(base, cells, out_dir) | {"quick": quick, "accuracy": accuracy}
    images = write_plots(summary, out_dir)
    written = [write_atomic(out_dir / "benchmark.json", json.dumps(summary, indent=1) + "\n"),
               write_atomic(out_dir / "benchmark.md", write_markdown(summary, [p.name for p in images])), *images]
    if failures:
        listing = "; ".join(f"{cell}: {error}" for cell, error in failures.items())
        message = f"{len(failures)} of {len(cells)} benchmark cells failed ({listing})"
        if all(isinstance(error, InputError) for error in failures.values()):
            raise InputError(message)
        raise RuntimeError(message)
    return summary, written
