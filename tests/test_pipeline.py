"""The pipeline: Prefect flows, MLflow records, DVC snapshots, replay, rollback,
history, schedules — and bad input to each command."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import assert_one_line_error, small_config, tree_digest, without_timings
from copal.config import build_config
from copal.rundir import RunDir
from copal.export import load_step_model
from cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _config(tmp_path, llama_dir, corpus_dir, name="pipe", domains=("alpha", "beta", "gamma"), **overrides):
    config = small_config(llama_dir, corpus_dir, name=name,
                          domains=[f"text:{corpus_dir / d}.txt" for d in domains], **overrides)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


def _masks(root, step):
    state = RunDir(root).step(step)
    return {name: state.mask(name) for name in state.mask_names()}


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, llama_dir, corpus_dir, prefect_api):
    """A 2-step run through the flow, then one more step via `copal step`."""
    tmp = tmp_path_factory.mktemp("pipeline")
    os.environ["COPAL_DATA_DIR"] = str(tmp / "arrow")
    path, _ = _config(tmp, llama_dir, corpus_dir, domains=("alpha", "beta"))
    result = invoke("run", path, "--out", tmp / "run")
    assert result.exit_code == 0, result.output
    result = invoke("step", f"text:{corpus_dir / 'gamma'}.txt", "--run", tmp / "run")
    assert result.exit_code == 0, result.output
    yield tmp
    os.environ.pop("COPAL_DATA_DIR", None)


def test_each_step_is_recorded_in_mlflow(tracked_run):
    from mlflow import MlflowClient

    tracking = json.loads((tracked_run / "run/tracking.json").read_text())
    client = MlflowClient()
    parent = client.get_run(tracking["parent_run_id"])
    assert parent.data.params["method"] == "copal" and parent.info.status == "FINISHED"
    children = client.search_runs([tracking["experiment_id"]],
                                  f"tags.mlflow.parentRunId = '{tracking['parent_run_id']}'")
    assert len(children) == 3
    by_step = {run.data.tags["copal.step"]: run for run in children}
    record = RunDir(tracked_run / "run").step(3).record
    child = by_step["3"].data
    assert child.params["domain"] == "gamma" and child.params["fingerprint"] == record.fingerprint
    assert child.metrics["ppl.gamma"] == pytest.approx(record.ppl["gamma"])
    assert {"bwt", "avg_ppl", "sparsity", "seconds", "peak_rss_mb"} <= child.metrics.keys()
    artifacts = {a.path for a in client.list_artifacts(by_step["3"].info.run_id)}
    assert {"model", "sensitivity", "ppl_matrix.png"} <= artifacts
    assert tracking["model_name"] == f"pipe-{tracking['parent_run_id'][:8]}"  # the run's identity, not its name
    versions = client.search_model_versions(f"name = '{tracking['model_name']}'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]


def test_registered_version_loads_bit_identical_to_export(tracked_run):
    from tasks.tracking import load_model_version

    tracking = json.loads((tracked_run / "run/tracking.json").read_text())
    registered, _ = load_model_version(tracking["model_name"], tracking["steps"]["2"]["model_version"])
    exported, _ = load_step_model(tracked_run / "run", 2)
    a, b = registered.state_dict(), exported.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the version stores masks over the base model, not weights
    model_files = {p.name for p in (tracked_run / "run/steps/2").iterdir()}
    assert "weights" not in model_files


def test_history_replay_rollback_and_continue(tracked_run, llama_dir, corpus_dir, tmp_path):
    run = tracked_run / "run"
    result = invoke("history", "--run", run, "--json")
    rows = json.loads(result.stdout)
    assert [(r["step"], r["domain"], r["head"]) for r in rows] == [(1, "alpha", False), (2, "beta", False),
                                                                    (3, "gamma", True)]
    assert all(r["mlflow_run_id"] for r in rows) and rows[2]["bwt"] is not None
    before = tree_digest(run)
    result = invoke("replay", "--run", run, "--step", 2)
    assert result.exit_code == 0 and "bit for bit" in result.stdout
    assert tree_digest(run) == before  # replay changes nothing

    assert invoke("rollback", "--run", run, "--step", 1).exit_code == 0
    assert RunDir(run).head() == 1 and (run / "steps/3").is_dir()
    assert invoke("step", f"text:{corpus_dir / 'gamma'}.txt", "--run", run).exit_code == 0
    assert RunDir(run).head() == 4 and RunDir(run).step(4).record.parent == 1

    from copal.continual import ContinualRun

    fresh = tmp_path / "fresh"
    _, config = _config(tmp_path, llama_dir, corpus_dir, domains=("alpha", "gamma"))
    ContinualRun(build_config(config), fresh).run()
    continued, direct = _masks(run, 4), _masks(fresh, 2)
    assert all(torch.equal(continued[n], direct[n]) for n in direct)
    rows = json.loads(invoke("history", "--run", run, "--json").stdout)
    assert [r["in_head_lineage"] for r in rows] == [True, False, False, True]


def test_scheduled_step_takes_the_next_domain_from_the_queue(tmp_path, llama_dir, corpus_dir, prefect_api,
                                                             data_dir):
    from flows.continual import continual_flow, scheduled_step_flow

    _, config = _config(tmp_path, llama_dir, corpus_dir, name="sched", domains=("alpha",))
    reports = []
    continual_flow(build_config(config), tmp_path / "run", progress=lambda *report: reports.append(report))
    assert ("prune blocks", 2, 2) in reports and any(what == "evaluate" for what, _, _ in reports)
    queue = tmp_path / "queue"
    queue.mkdir()
    (queue / "2-delta.txt").write_text((corpus_dir / "delta.txt").read_text())
    (queue / "1-beta.txt").write_text((corpus_dir / "beta.txt").read_text())
    (queue / "notes.md").write_text("not a domain")
    first = scheduled_step_flow(str(tmp_path / "run"), str(queue))
    second = scheduled_step_flow(str(tmp_path / "run"), str(queue))
    assert (first.domain, second.domain) == ("1-beta", "2-delta")
    assert scheduled_step_flow(str(tmp_path / "run"), str(queue)) is None
    assert RunDir(tmp_path / "run").head() == 3


def test_dvc_snapshots_each_step(tmp_path, llama_dir, corpus_dir, prefect_api, data_dir):
    from flows.continual import continual_flow

    project = tmp_path / "project"
    project.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, check=True)
    _, config = _config(tmp_path, llama_dir, corpus_dir, name="dvc", domains=("alpha", "beta"))
    continual_flow(build_config(config), project / "runs/dvc")
    revisions = json.loads((project / "runs/dvc/snapshots.json").read_text())
    for step in ("1", "2"):
        pointer = yaml.safe_load((project / f"runs/dvc/steps/{step}.dvc").read_text())
        assert revisions[step] == pointer["outs"][0]["md5"]
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, capture_output=True,
                            text=True, check=True)
    assert json.loads(status.stdout) == {}


def test_bad_input_to_pipeline_commands(tracked_run, tmp_path):
    run = tracked_run / "run"
    before = tree_digest(run)
    missing = tmp_path / "nope"
    for args, needle in [
        (["replay", "--run", missing, "--step", 1], "run directory not found"),
        (["rollback", "--run", missing, "--step", 1], "run directory not found"),
        (["history", "--run", missing], "run directory not found"),
        (["step", "text:/x.txt", "--run", missing], "run directory not found"),
        (["replay", "--run", run, "--step", 99], "no step 99"),
        (["rollback", "--run", run, "--step", 0], "no step 0"),
        (["rollback", "--run", run, "--step", 42], "no step 42"),
        (["step", f"text:{tmp_path / 'missing.txt'}", "--run", run], "not found"),
    ]:
        assert_one_line_error(invoke(*args), needle)
    assert tree_digest(run) == before


def test_corrupted_snapshot_is_exit_2_and_changes_nothing(tracked_run, tmp_path, corpus_dir):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(tracked_run / "run", copy)
    (copy / "tracking.json").unlink()  # keep MLflow out of this copy
    (copy / "HEAD").write_text("3\n")  # whatever other tests did to the original
    sensitivity = copy / "steps/2/sensitivity/block-0000.safetensors"  # step 3 accumulates onto it
    sensitivity.write_bytes(sensitivity.read_bytes()[:100])
    masks = copy / "steps/1/masks.safetensors"
    masks.write_bytes(b"garbage")
    before = tree_digest(copy)
    assert_one_line_error(invoke("replay", "--run", copy, "--step", 1), "steps/1/masks.safetensors")
    assert_one_line_error(invoke("replay", "--run", copy, "--step", 3), "steps/2/sensitivity/block-0000.safetensors")
    head = copy / "steps/3/sensitivity/block-0001.safetensors"
    head.write_bytes(head.read_bytes()[:-10])
    before = tree_digest(copy)
    assert_one_line_error(invoke("step", f"text:{corpus_dir / 'delta'}.txt", "--run", copy), "steps/3/sensitivity")
    assert tree_digest(copy) == before


def _cli(args, env, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "cli", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def test_kill_9_mid_run_then_resume_equals_uninterrupted(tmp_path, llama_dir, corpus_dir, isolated_services):
    env = {**os.environ, "COPAL_DATA_DIR": str(tmp_path / "arrow"), "PREFECT_HOME": str(tmp_path / "prefect")}
    path, config = _config(tmp_path, llama_dir, corpus_dir, name="crash", domains=("alpha", "beta", "gamma", "delta"))
    run = tmp_path / "run"
    victim = _cli(["run", path, "--out", run], env, start_new_session=True)
    deadline = time.time() + 300
    while not (run / "steps/.3.partial").exists():
        assert victim.poll() is None and time.time() < deadline, victim.stdout.read() if victim.poll() else "timeout"
        time.sleep(0.05)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    assert (run / "steps/2").is_dir() and not (run / "steps/3").exists()
    stamps = {p: p.stat().st_mtime_ns for p in (run / "steps/1").rglob("*")} | \
             {p: p.stat().st_mtime_ns for p in (run / "steps/2").rglob("*")}
    resumed = _cli(["run", path, "--out", run], env)
    output, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, output
    assert "step 1 (alpha) already recorded; not recomputed" in output
    assert "step 2 (beta) already recorded; not recomputed" in output
    assert all(p.stat().st_mtime_ns == stamp for p, stamp in stamps.items())

    from copal.continual import ContinualRun

    straight = ContinualRun(build_config(config), tmp_path / "straight", data_dir=tmp_path / "arrow").run()
    resumed_metrics = json.loads((run / "metrics.json").read_text())
    assert without_timings(resumed_metrics) == without_timings(straight)


def test_two_concurrent_runs_share_one_store(tmp_path, llama_dir, corpus_dir, isolated_services):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    env = {**os.environ, "COPAL_DATA_DIR": str(tmp_path / "arrow"), "PREFECT_HOME": str(tmp_path / "prefect"),
           "MLFLOW_TRACKING_URI": uri}
    jobs = []
    for name in ("left", "right"):
        path, _ = _config(tmp_path, llama_dir, corpus_dir, name=name, domains=("alpha", "beta"))
        jobs.append(_cli(["run", path, "--out", tmp_path / name], env))
    for job in jobs:
        output, _ = job.communicate(timeout=600)
        assert job.returncode == 0, output
    client = MlflowClient(uri, registry_uri=uri)
    for name in ("left", "right"):
        tracking = json.loads((tmp_path / name / "tracking.json").read_text())
        children = client.search_runs([tracking["experiment_id"]],
                                      f"tags.mlflow.parentRunId = '{tracking['parent_run_id']}'")
        assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)
        assert len(client.search_model_versions(f"name = '{tracking['model_name']}'")) == 2
