"""`copal bench --runner`: bad runners are one-line errors, and a two-cell grid on a
local Ray head (2 CPUs, loopback only) gives the local runner's numbers, with one
MLflow child run per cell under the grid's run."""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import assert_one_line_error, small_config, without_timings
from copal import grid as bench
from flows import bench as flow
from flows.cli import app

CELLS = ["wanda-sequential-u50", "copal-sequential-u50"]  # no cost cell: on Ray both run at once


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _config(tmp_path, llama_dir, corpus_dir, **resources) -> Path:
    raw = small_config(llama_dir, corpus_dir, domains=[f"text:{corpus_dir / n}.txt" for n in ("alpha", "beta")],
                       calibration={"nsamples": 4}, evaluation={"max_tokens": 512})
    raw["grid"] = {"structures": ["unstructured"], "cells": CELLS, "resources": {"cpus": 1, **resources}}
    path = tmp_path / f"bench-{len(resources)}.yaml"
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
    closed = _free_port()
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


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head on this machine: 2 CPUs, every port on 127.0.0.1, stopped (its whole
    process group) at the end. Yields the Ray Client address."""
    client_port = _free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray = Path(sys.executable).with_name("ray")
    # Loopback only. GRPC_ENABLE_FORK_SUPPORT=0: the head's Ray Client proxy forks a server
    # process per connection from a multi-threaded gRPC process; with gRPC's fork handlers on,
    # that child sometimes dies in the fork, before it writes a line ("Starting Ray client
    # server failed", ray-project/ray#63202): 1 connection in 6 here under load, 0 in 12 with
    # them off (the child only execs, so it needs none). And a busy 2-core machine can take
    # more than Ray's default 30 s before the new server's channel is ready.
    env = os.environ | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                        "GRPC_ENABLE_FORK_SUPPORT": "0", "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "180"}
    head = subprocess.Popen([str(ray), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                             f"--port={_free_port()}", f"--ray-client-server-port={client_port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}",
                             "--object-store-memory=100000000"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", client_port), timeout=1).close()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ray start failed: {head.stderr.read().decode()[-2000:]}")
                time.sleep(0.5)
        yield f"ray://127.0.0.1:{client_port}"
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # whatever of the group is still there
        except ProcessLookupError:
            pass
        head.wait()
        if not os.environ.get("COPAL_KEEP_RAY_LOGS"):
            subprocess.run(["rm", "-rf", temp])


def _children(parent: str) -> dict[str, str]:
    from mlflow import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_run(parent).info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent}'")
    return {run.data.tags["copal.cell"]: run for run in runs}


def test_a_grid_on_ray_gives_the_local_numbers_and_one_child_run_per_cell(ray_head, prefect_api, tmp_path,
                                                                         llama_dir, corpus_dir, data_dir):
    config = _config(tmp_path, llama_dir, corpus_dir)
    local = CliRunner().invoke(app, ["bench", "--config", str(config), "--out", str(tmp_path / "local")])
    assert local.exit_code == 0, local.output
    started = time.monotonic()
    remote = CliRunner().invoke(app, ["bench", "--config", str(config), "--out", str(tmp_path / "ray"),
                                      "--runner", ray_head])
    assert remote.exit_code == 0, remote.output
    print(f"two cells on Ray: {time.monotonic() - started:.1f} s")
    for cell_id in CELLS:
        metrics = [json.loads((tmp_path / out / "cells" / cell_id / "metrics.json").read_text())
                   for out in ("local", "ray")]
        assert without_timings(metrics[0]) == without_timings(metrics[1]), cell_id
    summary = json.loads((tmp_path / "ray" / "benchmark.json").read_text())
    assert summary["runner"] == "ray" and [c["id"] for c in summary["cells"]] == CELLS
    for out in ("local", "ray"):
        tracking = json.loads((tmp_path / out / "tracking.json").read_text())
        children = _children(tracking["parent_run_id"])
        assert sorted(children) == sorted(CELLS) == sorted(tracking["cells"])
        for cell_id, run in children.items():
            recorded = json.loads((tmp_path / out / "cells" / cell_id / "metrics.json").read_text())
            assert run.data.metrics["avg_ppl"] == pytest.approx(recorded["avg_ppl"])
            assert run.data.metrics["bwt"] == pytest.approx(recorded["bwt"])
            assert run.data.params["runner"] == ("local" if out == "local" else ray_head)
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
    assert_one_line_error(refused, "no Ray node can run a cell", "gpus 1")
    assert not (tmp_path / "gpu" / "cells").exists()


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
    monkeypatch.setattr(flow, "RAY_CONNECT_PAUSE_S", 0)
    flow.connect_ray(flow.parse_runner("ray://127.0.0.1:10001"))
    assert calls == ["ray://127.0.0.1:10001"] * 3
    # Never connects: one line after the last attempt; any other failure is not retried.
    calls.clear()
    monkeypatch.setattr(flow, "RAY_CONNECT_ATTEMPTS", 3)
    monkeypatch.setattr(ray, "init", lambda address, **kwargs: (calls.append(address), (_ for _ in ()).throw(dead)))
    with pytest.raises(flow.InputError, match=r"did not connect \(3 attempts\): RuntimeError: Starting Ray client"):
        flow.connect_ray(flow.parse_runner("ray://127.0.0.1:10001"), attempts=3)
    assert len(calls) == 3
    calls.clear()
    monkeypatch.setattr(ray, "init", lambda address, **kwargs: (calls.append(address),
                                                                 (_ for _ in ()).throw(ConnectionError("timeout"))))
    with pytest.raises(flow.InputError, match="did not connect: timeout"):
        flow.connect_ray(flow.parse_runner("ray://127.0.0.1:10001"))
    assert len(calls) == 1


def test_runner_addresses_parse():
    assert str(flow.parse_runner("ray://10.0.0.5:10001")) == "ray://10.0.0.5:10001"
    assert flow.parse_runner("dask://scheduler:8786").port == 8786
    assert not flow.parse_runner("local").cluster
    with pytest.raises(Exception, match="expected"):
        flow.parse_runner("ray://h:x")
    assert bench.Resources(cpus=2).cpus == 2
