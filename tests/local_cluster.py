"""Test harness: a Ray head or a Dask scheduler with one worker on this machine, every port on
127.0.0.1: what the runner integration tests and benchmarks/runner_overhead.py
run `--runner ray://…` and `--runner dask://…` against. Each is a context manager
that yields the runner address once it answers and stops the whole process group
it started; `answers` tells whether one still does."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _command(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _server(argv: list[str], env: dict) -> subprocess.Popen:
    """A server in a process session of its own (so `stop` reaches all it forks)."""
    return subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def stop(process: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM the process group, SIGKILL whatever of it is left after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            pass
    process.wait()


def _wait_until(ready, processes: list[subprocess.Popen], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if any(p.poll() is not None for p in processes) or time.monotonic() > deadline:
            errors = " | ".join(p.stderr.read().decode()[-1500:] for p in processes if p.poll() is not None)
            raise RuntimeError(f"{what} did not start: {errors or 'timed out'}")
        time.sleep(0.5)


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def answers(address: str) -> bool:
    """Whether the cluster at a runner address still serves: a Ray head's client port
    accepts connections; a Dask scheduler answers with at least one worker."""
    from copal.errors import InputError
    from flows.runners import dask_identity, parse_runner

    runner = parse_runner(address)
    if runner.kind == "ray":
        return _listening(runner.port)
    try:
        return bool(dask_identity(runner, timeout=5)["workers"])
    except InputError:
        return False


@contextmanager
def ray_head(cpus: int, env: dict | None = None):
    """A Ray head with `cpus` CPUs; yields its Ray Client address (ray://127.0.0.1:PORT).
    COPAL_KEEP_RAY_LOGS=1 keeps its session logs."""
    client_port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # Loopback only (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). GRPC_ENABLE_FORK_SUPPORT=0: the head's
    # Ray Client proxy forks a server process per connection from a multi-threaded gRPC process;
    # with gRPC's fork handlers on, that child sometimes dies in the fork, before it writes a line
    # ("Starting Ray client server failed", ray-project/ray#63202): 1 connection in 6 here under
    # load, 0 in 12 with them off (the child only execs, so it needs none). And a busy 2-core
    # machine can take more than Ray's default 30 s before the new server's channel is ready.
    env = (env or os.environ) | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
                                 "GRPC_ENABLE_FORK_SUPPORT": "0", "RAY_CLIENT_SERVER_CHECK_CHANNEL_TIMEOUT_S": "180"}
    head = _server([_command("ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
                    f"--port={free_port()}", f"--ray-client-server-port={client_port}", f"--num-cpus={cpus}",
                    "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}",
                    "--object-store-memory=100000000"], env)
    try:
        _wait_until(lambda: _listening(client_port), [head], "ray start")
        yield f"ray://127.0.0.1:{client_port}"
    finally:
        stop(head)
        if not os.environ.get("COPAL_KEEP_RAY_LOGS"):
            shutil.rmtree(temp, ignore_errors=True)


@contextmanager
def dask_cluster(cpus: int, env: dict | None = None):
    """A Dask scheduler and one worker with `cpus` threads, declaring the resource CPU=`cpus`
    (what a cell asks for); yields the runner address (dask://127.0.0.1:PORT) once the
    worker has joined. `env`: the servers' environment (PREFECT_API_URL for the workers)."""
    from flows.runners import dask_identity, parse_runner
    from copal.errors import InputError

    port = free_port()
    env = env or dict(os.environ)
    started = [_server([_command("dask"), "scheduler", "--host", "127.0.0.1", f"--port={port}", "--no-dashboard"],
                       env)]
    runner = parse_runner(f"dask://127.0.0.1:{port}")

    def joined() -> bool:
        try:
            return bool(dask_identity(runner, timeout=5)["workers"])
        except InputError:
            return False

    try:
        started.append(_server([_command("dask"), "worker", f"tcp://127.0.0.1:{port}", "--host", "127.0.0.1",
                                "--nworkers", "1", "--nthreads", str(cpus), "--resources", f"CPU={cpus}",
                                "--memory-limit", "0", "--no-dashboard"], env))
        _wait_until(joined, started, "dask scheduler and worker")
        yield str(runner)
    finally:
        for process in reversed(started):
            stop(process)
