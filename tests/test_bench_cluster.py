"""`copal bench --runner`: bad runners are one-line errors, and a two-cell grid on a
local Ray head (2 CPUs, loopback only) gives the local runner's numbers, with one
MLflow child run per cell under the grid's run."""

import json
import os
import socket
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import assert_one_line_error, small_config, without_timings
from copal import grid as bench
from flows import runners
from cli import app
from local_cluster import free_port

CELLS = ["wanda-sequential-u50", "copal-sequential-u50"]  # no cost cell: on Ray both run at once


def _config(tmp_path, llama_dir, corpus_dir, cpus: int | None = 1, **resources) -> Path:
    raw = small_config(llama_dir, corpus_dir, domains=[f"text:{corpus_dir / n}.txt" for n in ("alpha", "beta")],
                       calibration={"nsamples": 4}, evaluation={"max_tokens": 512})
    raw["grid"] = {"structures": ["unstructured"], "cells": CELLS,
                   "resources": ({"cpus": cpus} if cpus else {}) | resources}
    path = tmp_path / f"bench-{cpus}-{len(resources)}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("runner, needles", [
    ("slurm://head:1", ["--runner slurm://head:1", "local, ray://HOST:PORT or dask://HOST:PORT"]),
    ("ray://head", ["--runner ray://head", "expected"]),
])
def test_unknown_runners_are_one_line_errors(runner, needles, tmp_path):
    result = CliRunner().invoke(app, ["bench", "--quick", "--runner", runner, "--out", str(tmp_path / "out")])
    assert_one_line_error(result, *needles)


def test_an_unreachable_cluster_or_no_prefect_server_is_a_one_line_error(tmp_path, llama_dir, corpus_dir):
    config = _config(tmp_path, llama_dir, corpus_dir)
    closed = free_port()
    result = CliRunner().invoke(app, ["bench", "--config", str(config), "--runner", f"ray://127.0.0.1:{closed}",
                                      "--out", str(tmp_path / "out")])
    assert_one_line_error(result, f"ray://127.0.0.1:{closed}", "cannot connect")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with socket.socket() as listening, temporary_settings(restore_defaults={PREFECT_API_URL}):
        listening.bind(("127.0.0.1", 0))  # something answers, but there is no Prefect server (ephemeral API)
        listening.listen()
        port = listening.getsockname()[1]
        result = CliRunner().invoke(app, ["bench", "--config", str(config), "--runner", f"dask://127.0.0.1:{port}",
                                          "--out", str(tmp_path / "out")], env={"PREFECT_API_URL": ""})
    assert_one_line_error(result, "workers need a Prefect server", "PREFECT_API_URL")
    jobs = CliRunner().invoke(app, ["bench", "--config", str(config), "--runner", f"ray://127.0.0.1:{closed}",
                                    "--jobs", "2"])
    assert_one_line_error(jobs, "--jobs 2", "only for --runner local")
    assert not (tmp_path / "out").exists()


def _children(parent: str) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent}'")
    return {run.data.tags["copal.cell"]: run for run in runs}


@pytest.fixture(scope="module")
def local_grid(tmp_path_factory, llama_dir, corpus_dir, prefect_api):
    """The two-cell grid run by the local runner, once for this module: (config, OUT, data cache)."""
    root = tmp_path_factory.mktemp("grid")
    config, data = _config(root, llama_dir, corpus_dir), root / "arrow"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("COPAL_DATA_DIR", str(data))
        local = CliRunner().invoke(app, ["bench", "--config", str(config), "--out", str(root / "local")])
    assert local.exit_code == 0, local.output
    return config, root / "local", data


def _same_cells_and_children(local: Path, remote: Path, runner: str) -> dict:
    """The cells' metrics are the local runner's, and MLflow holds one child run per cell
    under each grid's parent run, with the cell's numbers; the remote grid's children."""
    for cell_id in CELLS:
        metrics = [json.loads((out / "cells" / cell_id / "metrics.json").read_text()) for out in (local, remote)]
        assert without_timings(metrics[0]) == without_timings(metrics[1]), cell_id
    summary = json.loads((remote / "benchmark.json").read_text())
    assert summary["runner"] == runner.partition(":")[0] and [c["id"] for c in summary["cells"]] == CELLS
    for out, name in ((local, "local"), (remote, runner)):
        tracking = json.loads((out / "tracking.json").read_text())
        children = _children(tracking["parent_run_id"])
        assert sorted(children) == sorted(CELLS) == sorted(tracking["cells"])
        for cell_id, run in children.items():
            recorded = json.loads((out / "cells" / cell_id / "metrics.json").read_text())
            assert run.data.metrics["avg_ppl"] == pytest.approx(recorded["avg_ppl"])
            assert run.data.metrics["bwt"] == pytest.approx(recorded["bwt"])
            assert run.data.params["runner"] == name
    return children


def test_a_grid_on_ray_gives_the_local_numbers_and_one_child_run_per_cell(ray_head, local_grid, tmp_path,
                                                                         llama_dir, corpus_dir, monkeypatch):
    config, local, data = local_grid
    monkeypatch.setenv("COPAL_DATA_DIR", str(data))
    started = time.monotonic()
    remote = CliRunner().invoke(app, ["bench", "--config", str(config), "--out", str(tmp_path / "ray"),
                                      "--runner", ray_head])
    assert remote.exit_code == 0, remote.output
    print(f"two cells on Ray: {time.monotonic() - started:.1f} s")
    _same_cells_and_children(local, tmp_path / "ray", ray_head)
    tracking = json.loads((tmp_path / "ray" / "tracking.json").read_text())
    # Resumed: nothing recomputed, no second child run.
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray" / "cells").rglob("*") if p.is_file()}
    again = CliRunner().invoke(app, ["bench", "--config", str(config), "--out", str(tmp_path / "ray"),
                                     "--runner", ray_head])
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ray" / "cells").rglob("*") if p.is_file()} == before
    assert len(_children(tracking["parent_run_id"])) == 2
    # A cell no node can hold would wait forever: it is refused instead.
    greedy = _config(tmp_path, llama_dir, corpus_dir, gpus=1)
    refused = CliRunner().invoke(app, ["bench", "--config", str(greedy), "--out", str(tmp_path / "gpu"),
                                       "--runner", ray_head])
    assert_one_line_error(refused, "no Ray node can run a task", "gpus 1")
    assert not (tmp_path / "gpu" / "cells").exists()


def test_a_grid_on_dask_gives_the_local_numbers_and_one_child_run_per_cell(dask_scheduler, local_grid, tmp_path,
                                                                          llama_dir, corpus_dir, monkeypatch):
    config, local, data = local_grid
    monkeypatch.setenv("COPAL_DATA_DIR", str(data))
    remote = CliRunner().invoke(app, ["bench", "--config", str(config), "--out", str(tmp_path / "dask"),
                                      "--runner", dask_scheduler])
    assert remote.exit_code == 0, remote.output
    _same_cells_and_children(local, tmp_path / "dask", dask_scheduler)
    greedy = _config(tmp_path, llama_dir, corpus_dir, gpus=1)
    refused = CliRunner().invoke(app, ["bench", "--config", str(greedy), "--out", str(tmp_path / "gpu"),
                                       "--runner", dask_scheduler])
    assert_one_line_error(refused, "no Dask worker can run a task", "GPU=1", "CPU")
    assert not (tmp_path / "gpu" / "cells").exists()


def test_without_cpus_dask_workers_of_any_size_give_the_local_cells_bit_for_bit(prefect_api, tmp_path, llama_dir,
                                                                               corpus_dir, monkeypatch):
    """No `cpus`: each cell pins the thread count the local runner gives it here (this
    process's threads), on a worker of 1 thread as on one of 2, and records it."""
    import torch
    from prefect.settings import PREFECT_API_URL

    from local_cluster import dask_cluster

    monkeypatch.setenv("COPAL_DATA_DIR", str(tmp_path / "arrow"))
    config = _config(tmp_path, llama_dir, corpus_dir, cpus=None)
    local = CliRunner().invoke(app, ["bench", "--config", str(config), "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    for threads in (1, 2):
        with dask_cluster(cpus=threads, env=os.environ | {"PREFECT_API_URL": PREFECT_API_URL.value()}) as address:
            out = tmp_path / f"dask-{threads}"
            remote = CliRunner().invoke(app, ["bench", "--config", str(config), "--out", str(out), "--runner", address])
        assert remote.exit_code == 0, remote.output
        for cell_id in CELLS:
            cells = [out / "cells" / cell_id, tmp_path / "local" / "cells" / cell_id]
            metrics = [without_timings(json.loads((cell / "metrics.json").read_text())) for cell in cells]
            assert metrics[0] == metrics[1], (threads, cell_id)
            for cell in cells:
                for step in (1, 2):
                    record = json.loads((cell / "steps" / str(step) / "step.json").read_text())
                    assert record["environment"]["threads"] == torch.get_num_threads()
            assert ((cells[0] / "steps/2/masks.safetensors").read_bytes()
                    == (cells[1] / "steps/2/masks.safetensors").read_bytes())


def test_a_port_that_is_not_a_dask_scheduler_is_a_one_line_error_not_a_hang(prefect_api, tmp_path, llama_dir,
                                                                           corpus_dir, monkeypatch):
    monkeypatch.setattr(runners, "DASK_ANSWER_TIMEOUT_S", 2.0)
    config = _config(tmp_path, llama_dir, corpus_dir)
    with socket.socket() as silent:  # accepts connections (the backlog), never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        started = time.monotonic()
        result = CliRunner().invoke(app, ["bench", "--config", str(config), "--runner", f"dask://127.0.0.1:{port}",
                                          "--out", str(tmp_path / "out")])
    assert_one_line_error(result, f"dask://127.0.0.1:{port}", "does not answer as a Dask scheduler", "2 s")
    assert time.monotonic() - started < 60
    assert not (tmp_path / "out").exists()


def test_a_ray_client_server_that_dies_at_start_is_retried_a_bounded_number_of_times(monkeypatch):
    import ray

    calls = []
    dead = ConnectionAbortedError("Initialization failure from server:\nTraceback ...\nRuntimeError: Starting Ray "
                                  "client server failed. See ray_client_server_23000.err for detailed logs.")

    def init(address, **kwargs):
        calls.append(address)
        if len(calls) < 3:
            raise dead

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(runners, "RAY_CONNECT_PAUSE_S", 0)
    runners.connect_ray(runners.parse_runner("ray://127.0.0.1:10001"))
    assert calls == ["ray://127.0.0.1:10001"] * 3
    # Never connects: one line after the last attempt; any other failure is not retried.
    calls.clear()
    monkeypatch.setattr(runners, "RAY_CONNECT_ATTEMPTS", 3)
    monkeypatch.setattr(ray, "init", lambda address, **kwargs: (calls.append(address), (_ for _ in ()).throw(dead)))
    with pytest.raises(runners.InputError, match=r"did not connect \(3 attempts\): RuntimeError: Starting Ray client"):
        runners.connect_ray(runners.parse_runner("ray://127.0.0.1:10001"), attempts=3)
    assert len(calls) == 3
    calls.clear()
    monkeypatch.setattr(ray, "init", lambda address, **kwargs: (calls.append(address),
                                                                 (_ for _ in ()).throw(ConnectionError("timeout"))))
    with pytest.raises(runners.InputError, match="did not connect: timeout"):
        runners.connect_ray(runners.parse_runner("ray://127.0.0.1:10001"))
    assert len(calls) == 1


def test_runner_addresses_parse():
    assert str(runners.parse_runner("ray://10.0.0.5:10001")) == "ray://10.0.0.5:10001"
    assert runners.parse_runner("dask://scheduler:8786").port == 8786
    assert not runners.parse_runner("local").cluster
    with pytest.raises(Exception, match="expected"):
        runners.parse_runner("ray://h:x")
    assert bench.Resources(cpus=2).cpus == 2


def test_a_shared_test_cluster_found_dead_is_started_again_and_stopped_at_the_end():
    """conftest.LocalCluster on a stand-in server: a listening socket as a Ray head's client port."""
    from contextlib import contextmanager

    from conftest import LocalCluster

    started, stopped = [], []

    @contextmanager
    def head():
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        started.append(server)
        try:
            yield f"ray://127.0.0.1:{server.getsockname()[1]}"
        finally:
            stopped.append(server)
            server.close()

    cluster = LocalCluster(head)
    first = cluster.address()
    assert cluster.address() == first and len(started) == 1  # alive: the same one
    started[0].close()  # the head dies between two tests
    second = cluster.address()
    assert second != first and len(started) == 2 and stopped == [started[0]]
    cluster.stop()
    assert stopped == started
