"""`copal run` over several runs (several configs, --sweep) on one runner: the same numbers
as single runs, one MLflow parent run each, resume, bad input before anything runs, a
failed run that costs no other, a Dask cluster; and DVC snapshots taken at the same time."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import assert_one_line_error, small_config, tree_digest, without_timings
from cli import app

SWEPT = {"0.4": "sw-sparsity-0.4", "0.6": "sw-sparsity-0.6"}


def invoke(*args, **kwargs):
    return CliRunner().invoke(app, [str(a) for a in args], **kwargs)


def _config(folder: Path, llama_dir: Path, corpus_dir: Path) -> Path:
    """Two domains, little calibration and evaluation data: a run of a few seconds."""
    raw = small_config(llama_dir, corpus_dir, name="sw",
                       domains=[f"text:{corpus_dir / name}.txt" for name in ("alpha", "beta")],
                       calibration={"nsamples": 4}, evaluation={"max_tokens": 512})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sw.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _metrics(run_dir: Path) -> dict:
    return without_timings(json.loads((run_dir / "metrics.json").read_text()))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, llama_dir, corpus_dir, prefect_api):
    """`copal run sw.yaml --sweep sparsity=0.4,0.6 --cpus 1`, locally, once for this module:
    (config, its parent folder, the data cache)."""
    root = tmp_path_factory.mktemp("runs")
    config = _config(root, llama_dir, corpus_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COPAL_DATA_DIR", str(root / "arrow"))
        result = invoke("run", config, "--sweep", "sparsity=0.4,0.6", "--cpus", 1, "--out", root / "many")
    assert result.exit_code == 0, result.output
    assert all(name in result.stdout for name in SWEPT.values())
    return config, root / "many", root / "arrow"


def test_a_sweep_equals_single_runs_with_one_mlflow_parent_run_each_and_resumes(sweep, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    config, many, data = sweep
    monkeypatch.setenv("COPAL_DATA_DIR", str(data))
    assert sorted(p.name for p in many.iterdir()) == sorted(SWEPT.values())
    client = MlflowClient()
    for value, name in SWEPT.items():
        single = invoke("run", config, "--set", f"sparsity={value}", "--cpus", 1, "--out", tmp_path / value)
        assert single.exit_code == 0, single.output
        assert _metrics(many / name) == _metrics(tmp_path / value)
        tracking = json.loads((many / name / "tracking.json").read_text())
        parent = client.get_run(tracking["parent_run_id"])
        assert parent.info.run_name == name and parent.info.status == "FINISHED"
        children = client.search_runs([tracking["experiment_id"]],
                                      f"tags.mlflow.parentRunId = '{tracking['parent_run_id']}'")
        assert len(children) == 2
        assert tracking["model_name"] == f"{name}-{tracking['parent_run_id'][:8]}"
        assert len(client.search_model_versions(f"name = '{tracking['model_name']}'")) == 2
    stamps = {p: p.stat().st_mtime_ns for p in many.rglob("steps/**/*") if p.is_file()}
    metrics = {name: _metrics(many / name) for name in SWEPT.values()}
    again = invoke("run", config, "--sweep", "sparsity=0.4,0.6", "--cpus", 1, "--out", many)
    assert again.exit_code == 0, again.output
    assert "already recorded; not recomputed" in again.stderr
    assert {p: p.stat().st_mtime_ns for p in many.rglob("steps/**/*") if p.is_file()} == stamps
    assert {name: _metrics(many / name) for name in SWEPT.values()} == metrics
    for name in SWEPT.values():
        tracking = json.loads((many / name / "tracking.json").read_text())
        assert len(client.search_runs([tracking["experiment_id"]],
                                      f"tags.mlflow.parentRunId = '{tracking['parent_run_id']}'")) == 2


def test_bad_input_is_one_line_naming_the_run_and_nothing_runs(tmp_path, llama_dir, corpus_dir, data_dir):
    config = _config(tmp_path, llama_dir, corpus_dir)
    twin = _config(tmp_path / "twin", llama_dir, corpus_dir)  # another file, the same name
    out = tmp_path / "out"
    cases = [
        ([config, twin], ["runs named sw more than once"]),
        ([config, "--sweep", "colour=red,blue"], ["run sw-colour-red:", "colour: unknown key"]),
        ([config, "--sweep", "sparsity=0.5,1.5"], ["run sw-sparsity-1.5:", "sparsity", "1.5"]),
        ([config, "--sweep", "sparsity=0.5", "--set", "sparsity=0.6"], ["--sweep sparsity", "--set"]),
        ([config, "--sweep", "sparsity"], ["--sweep 'sparsity'", "KEY=V1,V2"]),
        ([config, tmp_path / "missing.yaml"], ["missing.yaml", "config file not found"]),
        ([config, "--sweep", "sparsity=0.4,0.6", "--cpus", 0], ["--cpus 0", "greater than or equal to 1"]),
        ([config, "--sweep", "sparsity=0.4,0.6", "--runner", "slurm://x:1"], ["--runner slurm://x:1"]),
    ]
    for args, needles in cases:
        assert_one_line_error(invoke("run", *args, "--out", out), *needles)
        assert not out.exists()


def test_a_run_directory_of_another_config_is_refused_before_anything_runs(sweep, monkeypatch):
    config, many, data = sweep
    monkeypatch.setenv("COPAL_DATA_DIR", str(data))
    before = tree_digest(many)
    result = invoke("run", config, "--sweep", "sparsity=0.4,0.6", "--set", "method=wanda", "--out", many)
    assert_one_line_error(result, "run sw-sparsity-0.4:", "holds a run of another config", "method")
    assert tree_digest(many) == before


@pytest.mark.parametrize("error, code", [(RuntimeError("boom"), 1), (None, 2)])
def test_a_failed_run_costs_no_other(sweep, monkeypatch, error, code):
    """One run fails while running: the others finish and are listed, then one line names it."""
    import flows.continual
    from copal.errors import InputError

    config, many, data = sweep
    monkeypatch.setenv("COPAL_DATA_DIR", str(data))
    error = error or InputError("bad data")
    real = flows.continual.continual_flow

    def failing(config, out, *args, **kwargs):
        if config.name == SWEPT["0.6"]:
            raise error
        return real(config, out, *args, **kwargs)

    monkeypatch.setattr(flows.continual, "continual_flow", failing)
    result = invoke("run", config, "--sweep", "sparsity=0.4,0.6", "--cpus", 1, "--out", many)
    assert result.exit_code == code, result.output
    assert SWEPT["0.4"] in result.stdout and SWEPT["0.6"] not in result.stdout
    assert result.stderr.strip().splitlines()[-1] == f"copal: error: 1 of 2 runs failed ({SWEPT['0.6']}: {error})"


@pytest.mark.parametrize("cluster", ["dask_scheduler", "ray_head"])
def test_a_sweep_on_a_cluster_gives_the_local_numbers(cluster, request, sweep, tmp_path, monkeypatch):
    runner = request.getfixturevalue(cluster)  # this module's cluster, restarted if found dead
    config, many, data = sweep
    monkeypatch.setenv("COPAL_DATA_DIR", str(data))
    result = invoke("run", config, "--sweep", "sparsity=0.4,0.6", "--cpus", 1, "--runner", runner,
                    "--out", tmp_path / "cluster")
    assert result.exit_code == 0, result.output
    for name in SWEPT.values():
        assert _metrics(tmp_path / "cluster" / name) == _metrics(many / name)
        assert json.loads((tmp_path / "cluster" / name / "tracking.json").read_text())["parent_run_id"]


def test_a_git_ignored_run_directory_is_not_snapshotted(tmp_path, caplog):
    """DVC refuses to add a folder whose pointer file git ignores: the step is recorded
    without a revision, and the run says once why, instead of failing every snapshot."""
    from tasks.snapshot import snapshot_step

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".gitignore").write_text("/ignored/\n")
    revisions = {}
    for folder in ("ignored", "tracked"):
        for step_id in (1, 2):
            step = tmp_path / folder / "run" / "steps" / str(step_id)
            step.mkdir(parents=True)
            (step / "masks.bin").write_bytes(b"mask" * 100 * step_id)
            with caplog.at_level("INFO", logger="copal"):
                revisions[folder, step_id] = snapshot_step(step)
    assert revisions["ignored", 1] is None and revisions["ignored", 2] is None
    assert not (tmp_path / "ignored/run/steps/1.dvc").exists()
    said = [record.getMessage() for record in caplog.records if "snapshots are off" in record.getMessage()]
    assert len(said) == 1 and "ignored by git" in said[0]
    assert revisions["tracked", 1] == yaml.safe_load((tmp_path / "tracked/run/steps/1.dvc").read_text())["outs"][0]["md5"]


def test_dvc_adds_in_one_project_take_turns(tmp_path):
    """Two step directories snapshotted at once both succeed; a snapshot waits while the lock is held."""
    from tasks.snapshot import exclusive_dvc_add, snapshot_step

    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    steps = []
    for run in ("left", "right", "late"):
        step = tmp_path / "runs" / run / "steps" / "1"
        step.mkdir(parents=True)
        (step / "masks.bin").write_bytes(run.encode() * 1000)
        steps.append(step)
    revisions, errors = {}, []

    def snapshot(step: Path) -> None:
        try:
            revisions[step] = snapshot_step(step)
        except Exception as error:  # noqa: BLE001 - asserted below
            errors.append(error)

    threads = [threading.Thread(target=snapshot, args=(step,)) for step in steps[:2]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with exclusive_dvc_add(tmp_path):
        waiting = threading.Thread(target=snapshot, args=(steps[2],))
        waiting.start()
        waiting.join(timeout=3)
        assert waiting.is_alive() and steps[2] not in revisions
    waiting.join()
    assert errors == []
    for step in steps:
        pointer = yaml.safe_load(step.with_name("1.dvc").read_text())
        assert revisions[step] == pointer["outs"][0]["md5"]
