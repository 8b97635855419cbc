"""`copal bench`: a tiny grid run in and out of process, resumed, summarised and plotted."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY_TASK, assert_one_line_error, small_config
from copal import bench_report as report, grid as bench, plots
from copal.config import build_config
from copal.methods import METHODS
from copal.regimes import REGIMES
from copal.paths import PROJECT_ROOT
from copal.evaluator import Evaluator
from copal.records import BenchSummary
from flows import bench as flow
from cli import app


def _tiny_config(llama_dir, corpus_dir) -> dict:
    return small_config(llama_dir, corpus_dir, domains=[f"text:{corpus_dir / n}.txt" for n in ("alpha", "beta")],
                        calibration={"nsamples": 4}, evaluation={"max_tokens": 512})


def run_grid(base, cells, out, jobs=None, data_dir=None, progress=None, grid=bench.Grid(), alone=None):
    """The grid's flow on the local runner, as `copal bench` runs it."""
    return flow.bench_flow(base, grid, cells, out, "local", jobs, data_dir, alone=alone, progress=progress)


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def grid(tmp_path_factory, llama_dir, corpus_dir, prefect_api):
    """The quick grid's cells on two domains: the first in this process, the others in two workers."""
    root = tmp_path_factory.mktemp("bench")
    raw = _tiny_config(llama_dir, corpus_dir)
    base = bench.quick_config(build_config(raw))
    cells = bench.quick_grid()
    out, data_dir = root / "out", root / "arrow"
    assert run_grid(base, cells[:1], out, jobs=1, data_dir=data_dir) == {}
    first = _mtimes(bench.cell_dir(out, cells[0]))
    reports = []
    failures = run_grid(base, cells, out, jobs=2, data_dir=data_dir, alone=[],
                        progress=lambda what, done, total: reports.append((what, done, total)))
    assert failures == {}
    return {"root": root, "raw": raw, "base": base, "cells": cells, "out": out, "data_dir": data_dir,
            "first": first, "reports": reports}


def _metrics(grid, cell):
    return json.loads((bench.cell_dir(grid["out"], cell) / "metrics.json").read_text())


def test_finished_cells_are_skipped(grid):
    out, cells = grid["out"], grid["cells"]
    assert _mtimes(bench.cell_dir(out, cells[0])) == grid["first"]
    assert grid["reports"][0] == ("cells", 1, 3) and grid["reports"][-1] == ("cells", 3, 3)
    before = _mtimes(out / "cells")
    reports = []
    assert run_grid(grid["base"], cells, out, jobs=2, data_dir=grid["data_dir"],
                          progress=lambda *report: reports.append(report)) == {}
    assert _mtimes(out / "cells") == before
    assert reports == [("cells", 3, 3)]


def test_summary_holds_each_cells_recorded_metrics(grid):
    summary = report.summarize_grid(grid["base"], grid["cells"], grid["out"])
    assert summary.missing == []
    assert [c.id for c in summary.cells] == ["wanda-reprune-u50", "sparsegpt-reprune-u50", "copal-accumulate-u50"]
    for cell, entry in zip(grid["cells"], summary.cells):
        recorded = _metrics(grid, cell)
        assert entry.method == recorded["method"] == cell.method
        assert entry.regime == recorded["regime"] == cell.regime
        as_written = entry.as_json()
        for key in ("domains", "dense_ppl", "ppl", "bwt", "avg_ppl", "steps"):
            assert as_written[key] == recorded[key], key
        assert len(entry.ppl) == 2 and all(s.peak_rss_mb > 0 for s in entry.steps)
    dense = _metrics(grid, grid["cells"][0])["dense_ppl"]
    assert summary.dense.avg_ppl == pytest.approx(sum(dense) / len(dense))
    assert summary.setup.calibration["nsamples"] == 4


def test_markdown_tables_show_the_recorded_values(grid):
    summary = report.summarize_grid(grid["base"], grid["cells"], grid["out"])
    text = report.write_markdown(summary, ["bwt.png"])
    fmt = plots.format_value
    for cell in grid["cells"]:
        recorded = _metrics(grid, cell)
        assert f"| {cell.method} | {cell.regime} | {fmt(recorded['avg_ppl'])} | {fmt(recorded['bwt'])} |" in text
    assert f"| dense | – | {fmt(summary.dense.avg_ppl)} | – |" in text
    seconds = {c.method: [s["prune_seconds"] for s in _metrics(grid, c)["steps"]] for c in grid["cells"]}
    ratio = (sum(seconds["copal"]) / 2) / (sum(seconds["sparsegpt"]) / 2)
    assert f"copal's (hessian sensitivity) pruning time is {ratio:.2f}× sparsegpt's" in text
    stored = {c.method: [s["state_bytes"] for s in _metrics(grid, c)["steps"]] for c in grid["cells"]}
    assert all(size > 0 for sizes in stored.values() for size in sizes)
    assert f"| {sum(stored['copal']) / 2 / 1e6:.1f} |" in text  # the cost table's stored MB per step
    assert "![bwt](bwt.png)" in text and "Not yet run" not in text and "¹" not in text


def test_plots_are_written(grid, tmp_path):
    summary = report.summarize_grid(grid["base"], grid["cells"], grid["out"])
    written = report.write_plots(summary, tmp_path)
    assert sorted(p.name for p in written) == ["avg_ppl.png", "bwt.png", "ppl_matrix-copal-accumulate-u50.png",
                                               "ppl_matrix-wanda-reprune-u50.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG") and p.stat().st_size > 5000 for p in written)


def test_cli_quick_resumes_the_grid_and_writes_the_outputs(grid, tmp_path, data_dir):
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(grid["raw"]))
    before = _mtimes(grid["out"] / "cells")
    result = CliRunner().invoke(app, ["bench", "--quick", "--config", str(config), "--out", str(grid["out"]),
                                      "--jobs", "1"])
    assert result.exit_code == 0, result.output
    assert _mtimes(grid["out"] / "cells") == before  # every cell was already finished
    assert "copal-accumulate-u50" in result.stdout and "dense" in result.stdout
    summary = json.loads((grid["out"] / "benchmark.json").read_text())
    assert summary["quick"] is True and len(summary["cells"]) == 3
    assert (grid["out"] / "benchmark.md").read_text().startswith("# Continual pruning benchmark")
    assert (grid["out"] / "bwt.png").is_file()
    bad = CliRunner().invoke(app, ["bench", "--config", str(config), "--out", str(tmp_path / "x"), "--jobs", "0"])
    assert bad.exit_code == 2 and "--jobs 0" in bad.stderr


def test_report_only_writes_the_outputs_of_the_cells_so_far_and_runs_nothing(grid, tmp_path, data_dir):
    """The full grid over the quick grid's finished cells: the report has those three,
    lists the others as not yet run, and nothing is computed."""
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(grid["raw"]))
    out = tmp_path / "out"
    for cell in grid["cells"]:
        shutil.copytree(bench.cell_dir(grid["out"], cell), bench.cell_dir(out, cell))
    before = _mtimes(out / "cells")
    result = CliRunner().invoke(app, ["bench", "--config", str(config), "--out", str(out), "--report-only"])
    assert result.exit_code == 0, result.output
    assert _mtimes(out / "cells") == before and sorted(p.name for p in (out / "cells").iterdir()) == sorted(
        cell.id for cell in grid["cells"])
    summary = json.loads((out / "benchmark.json").read_text())
    assert [c["id"] for c in summary["cells"]] == [c.id for c in bench.full_grid() if c in grid["cells"]]
    assert len(summary["missing"]) == len(bench.full_grid()) - 3
    assert "Not yet run (" in (out / "benchmark.md").read_text()


def test_cells_restored_from_benchmark_json_report_the_same_numbers(grid, tmp_path, data_dir):
    """benchmarks/restore_cells.py: a grid whose cell directories are gone (only benchmark.json
    was committed) gets them back, so a resumed grid recomputes nothing it had finished."""
    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump(grid["raw"]))
    out = tmp_path / "out"
    for cell in grid["cells"]:
        shutil.copytree(bench.cell_dir(grid["out"], cell), bench.cell_dir(out, cell))
    report_only = ["bench", "--config", str(config), "--out", str(out), "--report-only"]
    assert CliRunner().invoke(app, report_only).exit_code == 0
    before = json.loads((out / "benchmark.json").read_text())
    shutil.rmtree(out / "cells")
    restore = [sys.executable, str(PROJECT_ROOT / "benchmarks" / "restore_cells.py"), "--config", str(config),
               "--out", str(out)]
    done = subprocess.run(restore, capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.split()) == sorted(["restored"] * 3 + [cell.id for cell in grid["cells"]])
    assert all(bench.is_finished(out, cell, len(grid["base"].domains)) for cell in grid["cells"])
    assert CliRunner().invoke(app, report_only).exit_code == 0
    assert json.loads((out / "benchmark.json").read_text()) == before
    # a run made outside the grid stands in for a cell only with the cell's own config
    other = subprocess.run(restore + ["--run", f"wanda-reprune-u50={bench.cell_dir(grid['out'], grid['cells'][1])}"],
                           capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert other.returncode != 0 and "its config differs from the cell's in" in other.stderr
    assert "method" in other.stderr.splitlines()[-1]


def test_grid_definition():
    cells = bench.full_grid()
    ids = [cell.id for cell in cells]
    assert len(ids) == len(set(ids)) == 3 * (1 + 3 * 4) + 2 * (1 + 2 * 3) + 3 * 2
    defaults = [c for c in cells if not c.variant]
    assert {c.regime for c in cells if c.method == "magnitude"} == {"reprune"}
    for method in list(METHODS)[1:]:
        for regime in REGIMES:
            assert {c.structure for c in defaults if (c.method, c.regime, c.sparsity) == (method, regime, 0.5)} \
                == set(bench.STRUCTURES)
    assert {(c.method, c.sparsity) for c in defaults if c.sparsity > 0.5} == {
        (m, s) for m in ("magnitude", "wanda", "copal") for s in (0.6, 0.7)}
    variants = {(c.variant, c.sparsity) for c in cells if c.variant}
    assert variants == {(v, s) for v in ("loss", "raw", "max") for s in (0.5, 0.7)}
    assert bench.cost_cells(cells) == [bench.Cell("magnitude", "reprune"), bench.Cell("wanda", "accumulate"),
                                       bench.Cell("sparsegpt", "accumulate"), bench.Cell("copal", "accumulate")]
    assert {c.id for c in bench.quick_grid()} <= set(ids)
    # sweep and variants also take lists of groups, each with its own settings
    grouped = bench.Grid(structures=[], sweep=[{"sparsities": [0.6], "methods": ["wanda"], "regimes": ["reprune"]},
                                               {"sparsities": [0.7], "methods": ["sparsegpt"], "regimes": ["accumulate"]}],
                         variants=[{"sparsities": [0.7], "names": ["loss"]},
                                   {"sparsities": [0.6], "structures": ["2:4"], "names": ["hessian"]}])
    assert [c.id for c in bench.full_grid(grouped)] == [
        "wanda-reprune-u60", "sparsegpt-accumulate-u70", "copal-accumulate-u70-loss", "copal-accumulate-u60-hessian",
        "copal-accumulate-2of4-hessian"]


def test_cell_configs_validate_and_quick_only_shrinks(llama_dir, corpus_dir):
    raw = small_config(llama_dir, corpus_dir, calibration={"nsamples": 64}, evaluation={"max_tokens": 65536})
    raw["domains"] = raw["domains"] * 2  # six domains
    base = build_config(raw)
    for cell in bench.full_grid():
        config = bench.cell_config(base, cell)
        assert (config.method, config.regime, config.structure, config.sparsity) == \
            (cell.method, cell.regime, cell.structure, cell.sparsity)
        expected = base.copal.model_dump() | bench.COPAL_VARIANTS.get(cell.variant, {})
        assert config.copal.model_dump() == expected
    owl = bench.cell_config(base, bench.Cell("copal", "accumulate", "unstructured", 0.7, "owl"))
    assert owl.sparsity_profile == "owl" and owl.copal.sensitivity == "hessian" and base.sparsity_profile == "uniform"
    # `hessian` and `owl` are SparseGPT's mask, `admm` the default's (the base's here)
    masks = {v: bench.cell_config(base, bench.Cell("copal", "accumulate", "unstructured", 0.7, v)).copal.mask
             for v in ("hessian", "owl", "admm", "output")}
    assert masks == {"hessian": "obs", "owl": "obs", "admm": "admm", "output": "obs"} and base.copal.mask == "admm"
    quick = bench.quick_config(base)
    assert quick.domains == base.domains[:3]
    assert quick.calibration.nsamples == 16 and quick.evaluation.max_tokens == 4096
    assert bench.quick_config(bench.quick_config(quick)) == quick


def test_markdown_layout_with_magnitude_sweep_variants_and_missing_cells():
    def cell(method, regime, structure="unstructured", sparsity=0.5, avg=10.0, bwt=1.0, variant=""):
        c = bench.Cell(method, regime, structure, sparsity, variant)
        step = {"step": 1, "domain": "a", "seconds": 2.0, "prune_seconds": 1.0, "peak_rss_mb": 100.0}
        return {"id": c.id, "label": c.label, "method": method, "regime": regime, "structure": structure,
                "sparsity": sparsity, "variant": variant, "options": {}, "domains": ["a"], "dense_ppl": [5.0],
                "ppl": [[avg]], "avg_ppl": avg, "bwt": bwt, "steps": [step]}

    summary = {"setup": {"model": "m", "domains": ["builtin:a", "builtin:b"],
                         "calibration": {"nsamples": 8, "seqlen": 64, "seed": 0},
                         "evaluation": {"seqlen": 64, "max_tokens": 512}, "dtype": "float32"},
               "notes": {"magnitude": bench.MAGNITUDE_NOTE, "variants": bench.VARIANT_NOTES},
               "cost_cells": ["copal-accumulate-u50"],
               "dense": {"domains": ["a", "b"], "ppl": [5.0, 7.0], "avg_ppl": 6.0},
               "cells": [cell("magnitude", "reprune", "2:4", avg=99.0, bwt=0.0),
                         cell("wanda", "reprune", "2:4", avg=90.0, bwt=2.0),
                         cell("copal", "accumulate", avg=11.0, bwt=-0.5),
                         cell("copal", "accumulate", sparsity=0.7, avg=30.0, bwt=-2.0),
                         cell("copal", "accumulate", sparsity=0.7, avg=28.0, bwt=-3.0, variant="loss"),
                         cell("copal", "accumulate", "2:4", avg=60.0, bwt=0.5, variant="reconstruct"),
                         cell("copal", "accumulate", "2:4", avg=60.0, bwt=0.5, variant="hessian")],
               "missing": ["wanda-reprune-u50"]}
    text = report.write_markdown(BenchSummary.model_validate(summary))
    assert "| method | regime | 50 % unstructured avg PPL | 50 % unstructured BWT | 2:4 avg PPL | 2:4 BWT |" in text
    assert "| dense | – | 6.00 | – | 6.00 | – |" in text
    assert "| magnitude | any¹ |  |  | 99.00 | 0.00 |" in text
    assert f"¹ {bench.MAGNITUDE_NOTE}." in text
    assert "| copal | accumulate | 11.00 | -0.50 |  |  |" in text
    assert "## Sparsity sweep, unstructured" in text
    assert "- 2:4: magnitude's average PPL is 1.10× wanda/reprune's." in text
    assert "| wanda | reprune |  |  | 90.00 | 2.00 |" in text
    assert "| wanda | reprune |  |  |  |  |" not in text  # the sweep lists only what it swept
    assert "| copal | accumulate | 11.00 | -0.50 | 30.00 | -2.00 |" in text  # the variant stays out of it
    assert "| 70 % avg PPL | 70 % BWT | 70 % pruning s/step | 2:4 avg PPL | 2:4 BWT | 2:4 pruning s/step |" in text
    notes = {key: note.replace("|", "\\|") for key, note in bench.VARIANT_NOTES.items()}  # | in a table cell
    assert f"| configured | {notes['']} (hessian sensitivity) | 30.00 | -2.00 | 1.00 |  |  |  |" in text
    assert f"| loss | {notes['loss']} | 28.00 | -3.00 | 1.00 |  |  |  |" in text
    assert f"| raw | {notes['raw']} |" not in text  # no cell of it: no row
    assert f"| reconstruct | {notes['reconstruct']} |  |  |  | 60.00 | 0.50 | 1.00 |" in text
    # the targets judge the configured copal and the second-order variant against the best baseline
    assert "| 2:4 | configured |" not in text and "| 2:4 | hessian | 0.50 | 2.00 | 0.25 | **missed** | 60.00 " \
        "| wanda/reprune | 90.00 | 0.667 | met |" in text
    assert "| copal | accumulate | 2.0 | 1.00 | 100 |" in text
    assert "Not yet run (1): wanda-reprune-u50." in text


def test_default_jobs_fits_memory_and_cores():
    assert bench.default_jobs(peak_mb=1000, available_mb=10000, cores=16) == 8
    assert bench.default_jobs(peak_mb=1000, available_mb=10000, cores=2) == 2
    assert bench.default_jobs(peak_mb=50000, available_mb=10000, cores=8) == 1


def test_cost_cells_run_alone_first_and_every_cell_shares_one_dense_row(tmp_path, llama_dir, corpus_dir,
                                                                          monkeypatch, prefect_api):
    base = bench.quick_config(build_config(_tiny_config(llama_dir, corpus_dir)))
    cells = [bench.Cell("wanda", "sequential"), bench.Cell("copal", "accumulate"), bench.Cell("magnitude", "reprune")]
    order, measured = [], []
    real_run_cell, real_dense = flow.run_cell, Evaluator.dense_ppl

    def run_cell(config, root, data_dir, threads, progress=None, known_dense=None):
        order.append((config.name, known_dense is not None))
        real_run_cell(config, root, data_dir, threads, progress, known_dense)

    def dense_ppl(evaluator):
        session = evaluator.session
        before = session.dir.dense_path.exists() or set(evaluator.known_dense) >= {d.name for d in session.domains}
        measured.append(not before)
        return real_dense(evaluator)

    monkeypatch.setattr(flow, "run_cell", run_cell)
    monkeypatch.setattr(Evaluator, "dense_ppl", dense_ppl)
    alone = bench.cost_cells(cells)
    assert alone == [bench.Cell("magnitude", "reprune"), bench.Cell("copal", "accumulate")]
    assert run_grid(base, cells, tmp_path / "out", jobs=1, data_dir=tmp_path / "arrow") == {}
    assert order == [("magnitude-reprune-u50", False), ("copal-accumulate-u50", True),
                     ("wanda-sequential-u50", True)]
    assert measured == [True, False, False]
    rows = {cell.id: _metrics_of(tmp_path / "out", cell)["dense_ppl"] for cell in cells}
    assert len({tuple(row) for row in rows.values()}) == 1
    other = bench.cell_config(base, cells[0]).model_copy(update={"evaluation": base.evaluation.model_copy(
        update={"max_tokens": 256})})
    assert bench.shared_dense(tmp_path / "out", cells, other, {}) is None  # another evaluation setting


def _metrics_of(out, cell):
    return json.loads((bench.cell_dir(out, cell) / "metrics.json").read_text())


def test_grid_section_shapes_the_smollm2_grid(tmp_path):
    base, grid = bench.load_bench_config(PROJECT_ROOT / "configs" / "smollm2.yaml")
    cells = bench.full_grid(grid)
    ids = [cell.id for cell in cells]
    # the 48 cells of issue 9, then issue 20's: sparsegpt/accumulate at 60/70 %, SparseGPT's mask (hessian) and
    # ADMM's (the default) at 4 settings each, OWL's profile at 50 and 70 %
    assert len(ids) == len(set(ids)) == 2 * (1 + 3 * 4) + 2 * (1 + 2 * 2) + 3 * 4 + 2 + 4 + 4 + 2
    assert {c.structure for c in cells} == {"unstructured", "2:4"}
    assert {(c.method, c.regime, c.sparsity) for c in cells if c.sparsity > 0.5 and not c.variant} == {
        ("magnitude", "reprune", s) for s in (0.6, 0.7)} | {
        (m, r, s) for m in ("wanda", "copal") for r in ("reprune", "accumulate") for s in (0.6, 0.7)} | {
        ("sparsegpt", "accumulate", s) for s in (0.6, 0.7)}
    assert ids[:13] == [c.id for c in bench.full_grid(grid) if c.sparsity == 0.5 and c.structure == "unstructured"
                        and not c.variant]  # the main table runs first
    assert {c.id for c in cells if c.variant} == {f"copal-accumulate-{shape}-{v}" for shape in ("u50", "u70", "2of4")
                                                   for v in ("loss", "raw", "max", "reconstruct")} | {
        f"copal-accumulate-{shape}-{v}" for shape in ("u50", "u60", "u70", "2of4") for v in ("hessian", "admm")} | {
        "copal-accumulate-u50-owl", "copal-accumulate-u70-owl"}
    bench.check_task_cells(grid.tasks, cells)
    assert base.model == "data/models/smollm2-135m" and not base.evaluation.tasks
    from copal.config import load_config

    # `copal run configs/smollm2.yaml` runs the grid's base config (the grid section is bench-only)
    assert load_config(PROJECT_ROOT / "configs" / "smollm2.yaml", []) == base
    # grid.cells narrows what runs; the accuracy cells stay checked against the whole grid
    raw = yaml.safe_load((PROJECT_ROOT / "configs" / "smollm2.yaml").read_text())
    raw["grid"]["cells"] = ["copal-accumulate-u50-reconstruct"]
    narrowed = tmp_path / "first.yaml"
    narrowed.write_text(yaml.safe_dump(raw))
    assert [cell.id for cell in bench.plan(narrowed, quick=False)[2]] == ["copal-accumulate-u50-reconstruct"]


@pytest.mark.parametrize("grid, needles", [
    ({"structures": ["3:4"]}, ["grid: structures.0"]),
    ({"sweep": {"sparsities": [1.5]}}, ["grid: sweep.0.sparsities.0", "less than 1"]),
    ({"variants": [{"names": ["hessian"]}, {"names": ["nope"]}]}, ["grid: variants.1.names.0"]),
    ({"variant": {}}, ["grid: variant", "unknown key"]),
    ({"tasks": {"names": ["copal_wordnet_define"], "cells": ["wanda-nothing-u50"]}},
     ["grid.tasks.cells", "wanda-nothing-u50", "not in this grid"]),
    ({"tasks": {"cells": ["wanda-reprune-u50"]}}, ["grid.tasks.names is empty"]),
])
def test_bad_grid_sections_are_one_line_errors(llama_dir, corpus_dir, tmp_path, grid, needles):
    config = tmp_path / "bench.yaml"
    config.write_text(yaml.safe_dump(_tiny_config(llama_dir, corpus_dir) | {"grid": grid}))
    result = CliRunner().invoke(app, ["bench", "--config", str(config), "--out", str(tmp_path / "out")])
    assert_one_line_error(result, *needles)
    assert not (tmp_path / "out" / "cells").exists()


def test_grid_accuracy_measures_the_dense_and_final_models_once(grid, tiny_task):
    folder, count, _ = tiny_task
    tasks = bench.GridTasks(names=[TINY_TASK], include_path=str(folder), limit=6,
                            cells=["wanda-reprune-u50", "copal-accumulate-u50"])
    reports = []
    accuracy = bench.grid_accuracy(grid["base"], tasks, grid["cells"], grid["out"],
                                   progress=lambda *report: reports.append(report))
    assert set(accuracy.cells) == {"wanda-reprune-u50", "copal-accumulate-u50"}
    for result in [accuracy.dense, *accuracy.cells.values()]:
        assert 0.0 <= result[TINY_TASK]["acc"] <= 1.0 and "acc_stderr" in result[TINY_TASK]
    assert reports[0] == ("task accuracy", 0, 3) and reports[-1] == ("task accuracy", 3, 3)
    # The final model is the pruned one: its accuracy is what copal eval gives for the exported step.
    recorded = json.loads((grid["out"] / "tasks" / "wanda-reprune-u50.json").read_text())
    assert recorded["tasks"] == accuracy.cells["wanda-reprune-u50"] and recorded["setup"]["limit"] == 6
    before = _mtimes(grid["out"] / "tasks")
    assert bench.grid_accuracy(grid["base"], tasks, grid["cells"], grid["out"]) == accuracy
    assert _mtimes(grid["out"] / "tasks") == before  # measured once
    summary = report.summarize_grid(grid["base"], grid["cells"], grid["out"]).model_copy(update={"accuracy": accuracy})
    text = report.write_markdown(summary)
    dense = accuracy.dense[TINY_TASK]
    assert f"| dense | {100 * dense['acc']:.1f} ± {100 * dense['acc_stderr']:.1f} |" in text
    assert "| wanda/reprune, 50 % unstructured |" in text and "the first 6 items" in text
    assert bench.grid_accuracy(grid["base"], bench.GridTasks(), grid["cells"], grid["out"]) is None
    # Reporting only (copal bench --report-only) reads what is recorded and writes nothing.
    elsewhere = grid["out"].parent / "report-only"
    assert bench.grid_accuracy(grid["base"], tasks, grid["cells"], elsewhere, measure=False) is None
    assert not elsewhere.exists()
