"""Downstream accuracy through lm-evaluation-harness: `copal eval --tasks`, task
accuracies in a run's records and MLflow, bad task input, and the builtin
tasks' item generator."""

import hashlib
import json
import os

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY_TASK as TINY, assert_one_line_error, read_json, small_config, write_jsonl
from cli import app
from copal.rundir import RunDir

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def _check_accuracy(tasks: dict, items: dict, sha256: str, count: int) -> None:
    assert set(tasks) == {TINY}
    metrics = tasks[TINY]
    assert set(metrics) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert 0.0 <= metrics["acc"] <= 1.0 and 0.0 <= metrics["acc_norm"] <= 1.0
    # acc is a mean over `count` items of 0/1: a multiple of 1/count.
    assert metrics["acc"] * count == pytest.approx(round(metrics["acc"] * count))
    assert items == {TINY: {"items": count, "sha256": sha256}}


def test_eval_tasks_prints_accuracy_json(tiny_task, llama_dir, corpus_dir, data_dir):
    folder, count, sha256 = tiny_task
    result = invoke("eval", "--model", llama_dir, "--tasks", TINY, "--include-path", folder, "--device", "cpu")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)  # one JSON object and nothing else on stdout
    assert set(printed) == {"tasks", "task_items"}
    _check_accuracy(printed["tasks"], printed["task_items"], sha256, count)

    # --data and --tasks: both results in one object; the same accuracy again.
    both = invoke("eval", "--model", llama_dir, "--data", f"text:{corpus_dir / 'alpha'}.txt", "--seqlen", 64,
                  "--max-tokens", 1024, "--tasks", f"{TINY},{TINY}", "--include-path", folder, "--device", "cpu")
    assert both.exit_code == 0, both.output
    combined = json.loads(both.stdout)
    assert set(combined) == {"ppl", "tokens", "tasks", "task_items"} and combined["ppl"] > 1
    assert combined["tasks"] == printed["tasks"]

    # --task-limit: the first N items, named by their own SHA-256.
    limited = json.loads(invoke("eval", "--model", llama_dir, "--tasks", TINY, "--include-path", folder,
                                "--task-limit", 3, "--device", "cpu").stdout)
    assert limited["task_items"][TINY]["items"] == 3 and limited["task_items"][TINY]["sha256"] != sha256


def test_bad_task_input_is_one_line_exit_2(tiny_task, llama_dir, corpus_dir, tmp_path, data_dir):
    folder, _, _ = tiny_task
    cases = [
        (["--tasks", "no_such_task_xyz"], ["no_such_task_xyz", "unknown task"]),
        (["--tasks", TINY, "--include-path", tmp_path / "missing"], [str(tmp_path / "missing"), "not found"]),
        (["--tasks", TINY, "--include-path", folder / "tiny.yaml"], ["not a folder"]),
        (["--tasks", TINY], [TINY, "unknown task"]),  # a local task without its include path
        (["--include-path", folder], ["only used with --tasks"]),
        ([], ["--data", "--tasks"]),
        (["--tasks", " , "], ["no task names"]),
        (["--tasks", TINY, "--include-path", folder, "--task-limit", 0], ["--task-limit"]),
    ]
    for args, needles in cases:
        assert_one_line_error(invoke("eval", "--model", llama_dir, *args), *needles)

    # A run whose config names an unknown task fails in preflight, before anything is recorded.
    config = small_config(llama_dir, corpus_dir, evaluation={"tasks": ["no_such_task_xyz"]})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert_one_line_error(invoke("run", path, "--out", tmp_path / "run"), "no_such_task_xyz")
    assert not (tmp_path / "run").exists()
    config = small_config(llama_dir, corpus_dir, evaluation={"tasks": [TINY],
                                                             "task_include_path": str(tmp_path / "gone")})
    path.write_text(yaml.safe_dump(config))
    assert_one_line_error(invoke("run", path, "--out", tmp_path / "run"), str(tmp_path / "gone"))


def test_run_records_task_accuracies(tiny_task, llama_dir, corpus_dir, tmp_path, data_dir, prefect_api):
    from mlflow import MlflowClient

    folder, count, sha256 = tiny_task
    config = small_config(llama_dir, corpus_dir, name="tasks-run",
                          domains=[f"text:{corpus_dir / d}.txt" for d in ("alpha", "beta")],
                          evaluation={"tasks": [TINY], "task_include_path": str(folder)})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = invoke("run", path, "--out", tmp_path / "run")
    assert result.exit_code == 0, result.output

    run_dir = RunDir(tmp_path / "run")
    dense = read_json(run_dir.dense_tasks_path)
    _check_accuracy(dense["tasks"], dense["task_items"], sha256, count)
    metrics = read_json(run_dir.metrics_path)
    assert metrics["dense_tasks"] == dense["tasks"]
    tracking = read_json(run_dir.root / "tracking.json")
    client = MlflowClient()
    parent = client.get_run(tracking["parent_run_id"]).data.metrics
    assert parent[f"dense/task/{TINY}/acc"] == pytest.approx(dense["tasks"][TINY]["acc"])
    for step, summary in zip((1, 2), metrics["steps"]):
        record = run_dir.step(step).record
        _check_accuracy(record.tasks, record.task_items, sha256, count)
        assert summary["tasks"] == record.tasks
        child = client.get_run(tracking["steps"][str(step)]["run_id"]).data
        for metric, value in record.tasks[TINY].items():
            assert child.metrics[f"task/{TINY}/{metric}"] == pytest.approx(value)
        assert child.params[f"task_items/{TINY}/sha256"] == sha256


def test_runs_without_tasks_record_no_task_keys(tmp_path):
    """The default (evaluation.tasks empty) leaves step.json and metrics.json as they were."""
    from copal.config import build_config
    from copal.rundir import summarize

    config = build_config({"model": "m", "domains": ["builtin:docs"]})
    assert config.evaluation.tasks == [] and config.evaluation.task_limit is None
    assert "dense_tasks" not in summarize(RunDir(tmp_path), config).as_json()


@pytest.mark.parametrize("task", ["copal_wordnet_define", "copal_fortune_ending"])
def test_builtin_task_items_are_deterministic(task, data_dir):
    from copal.data import ingest
    from copal.lm_tasks import TASK_DIR, builtin_items, items_sha256, task_data_path

    settings = yaml.safe_load((TASK_DIR / f"{task}.yaml").read_text().replace("!function", ""))["metadata"]
    first = builtin_items(task, settings["items"], settings["seed"])
    again = builtin_items(task, settings["items"], settings["seed"])
    assert first == again and len(first) == settings["items"] >= 200
    assert builtin_items(task, settings["items"], settings["seed"] + 1) != first
    for item in first:
        choices = item["choices"]
        assert len(choices) == 4 and len({c.lower() for c in choices}) == 4  # distractors ≠ answer, distinct
        assert 0 <= item["label"] < 4
    labels = [item["label"] for item in first]
    assert all(labels.count(label) > len(first) // 8 for label in range(4))  # the answer's place is shuffled

    # From the evaluation part only (disjoint from calibration and the reference model's training data).
    evaluation = ingest("builtin:lexicon" if task == "copal_wordnet_define" else "builtin:fortunes").texts("evaluation")
    if task == "copal_wordnet_define":
        headwords = {text.split("\n", 1)[0].strip() for text in evaluation}
        for item in first:
            answer = item["choices"][item["label"]]
            assert answer in headwords and answer[:5] not in item["definition"].lower()
    else:
        flat = [" ".join(text.split()) for text in evaluation]
        for item in first:
            context = " ".join(item["context"].split())
            assert any(text.startswith(context) for text in flat)

    # lm-eval's loader gives the same items, and writes them where the SHA-256 names them.
    from copal import lm_tasks

    loader = lm_tasks.load_wordnet_define if task == "copal_wordnet_define" else lm_tasks.load_fortune_ending
    dataset = loader(**settings)["test"]
    assert [dict(row) for row in dataset] == first
    written = task_data_path(task)
    assert written.parent.parent == data_dir
    assert hashlib.sha256(written.read_bytes()).hexdigest() == items_sha256(first)
    assert os.path.getsize(written) > 10_000
