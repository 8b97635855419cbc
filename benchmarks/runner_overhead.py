"""What a cluster runner costs per cell: the same benchmark cells run by `copal bench`
with --runner local, on a Ray head and on a Dask scheduler, all on this machine.

Every runner gets the same serial work: each cell pins one thread (grid.resources.cpus
1); the local runner runs one cell at a time (--jobs 1), the Ray head has 1 CPU and the
Dask worker 1 thread. The time spent outside the cells' steps (wall minus the steps'
recorded seconds: the grid's setup, each cell's model load and dense evaluation, and
what the runner adds) is compared with the local runner's; the difference, divided by
the number of cells, is the runner's overhead per cell: shipping the task, the
worker's imports, Prefect's task-run reporting from the worker. Subtracting the steps'
own seconds keeps a busy machine's slower steps out of the overhead. All three report to one
Prefect server (a cluster needs one), and each checks that its cells' numbers equal
the local runner's.

    python benchmarks/runner_overhead.py --out reports/runner_overhead.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.request import urlopen

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the project, and the test harness's local clusters

from copal.records import RunMetrics  # noqa: E402
from local_cluster import dask_cluster, free_port, ray_head, stop  # noqa: E402

CELLS = ["wanda-sequential-u50", "wanda-reprune-u50", "wanda-accumulate-u50",
         "copal-sequential-u50", "copal-reprune-u50", "copal-accumulate-u50"]
TIMING_KEYS = ("seconds", "prune_seconds", "peak_rss_mb")


def bench_config(folder: Path, nsamples: int, max_tokens: int) -> Path:
    """configs/bench.yaml on 3 domains, lighter, narrowed to CELLS with one thread each."""
    raw = yaml.safe_load((ROOT / "configs" / "bench.yaml").read_text())
    raw["model"] = str(ROOT / raw["model"])
    raw["domains"] = raw["domains"][:3]
    raw["calibration"]["nsamples"] = nsamples
    raw["evaluation"]["max_tokens"] = max_tokens
    raw["grid"] = {"structures": ["unstructured"], "cells": CELLS, "resources": {"cpus": 1}}
    path = folder / "bench.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def prefect_server(home: Path, env: dict) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).with_name("prefect")), "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], env=env | {"PREFECT_HOME": str(home)},
                              start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while True:
        try:
            urlopen(url + "/health", timeout=2).close()
            return server, url
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("prefect server did not start")
            time.sleep(1)


def run_grid(config: Path, out: Path, runner: str, env: dict) -> float:
    """Wall seconds of one `copal bench` over the cells."""
    argv = [str(Path(sys.executable).with_name("copal")), "bench", "--config", str(config), "--out", str(out),
            "--runner", runner, "--tracking-uri", f"sqlite:///{out.parent / (out.name + '-mlflow.db')}"]
    if runner == "local":
        argv += ["--jobs", "1"]
    started = time.monotonic()
    result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"copal bench --runner {runner} failed: {result.stderr[-2000:]}")
    return time.monotonic() - started


def cell_metrics(out: Path) -> dict[str, RunMetrics]:
    return {cell: RunMetrics.model_validate(json.loads((out / "cells" / cell / "metrics.json").read_text()))
            for cell in CELLS}


def without_timings(metrics: RunMetrics) -> dict:
    return metrics.model_copy(update={"steps": [step.model_copy(update=dict.fromkeys(TIMING_KEYS))
                                                for step in metrics.steps]}).as_json()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=4096)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "runner_overhead.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="runners") as temp:
        temp = Path(temp)
        config = bench_config(temp, args.nsamples, args.max_tokens)
        base_env = os.environ | {"COPAL_DATA_DIR": str(temp / "arrow"), "OMP_NUM_THREADS": "1",
                                 "PREFECT_HOME": str(temp / "prefect-client")}
        server, url = prefect_server(temp / "prefect", base_env)
        env = base_env | {"PREFECT_API_URL": url}
        try:
            subprocess.run([str(Path(sys.executable).with_name("copal")), "ingest", "--help"], env=env,
                           capture_output=True)  # warm the interpreter's caches before timing anything
            rows = {}
            rows["local"] = {"wall_seconds": run_grid(config, temp / "local", "local", env)}
            started = time.monotonic()
            with ray_head(cpus=1, env=env) as address:
                rows["ray"] = {"start_seconds": time.monotonic() - started,
                               "wall_seconds": run_grid(config, temp / "ray", address, env)}
            started = time.monotonic()
            with dask_cluster(cpus=1, env=env) as address:
                rows["dask"] = {"start_seconds": time.monotonic() - started,
                                "wall_seconds": run_grid(config, temp / "dask", address, env)}
            local = cell_metrics(temp / "local")
            for runner, row in rows.items():
                metrics = cell_metrics(temp / runner)
                row["step_seconds"] = sum(step.seconds for m in metrics.values() for step in m.steps)
                row["outside_steps_seconds"] = row["wall_seconds"] - row["step_seconds"]
                row["identical_to_local"] = all(without_timings(metrics[c]) == without_timings(local[c])
                                                for c in CELLS)
            for row in rows.values():
                row["overhead_per_cell_seconds"] = ((row["outside_steps_seconds"]
                                                     - rows["local"]["outside_steps_seconds"]) / len(CELLS))
        finally:
            stop(server)
    report = {"cells": CELLS, "model": "data/models/reference", "domains": 3, "nsamples": args.nsamples,
              "max_tokens": args.max_tokens, "threads_per_cell": 1, "cells_at_once": 1,
              "machine": f"{os.cpu_count()} cores", "runners": rows,
              "command": "python benchmarks/runner_overhead.py"}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
