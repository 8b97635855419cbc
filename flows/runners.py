"""Where a flow's tasks run (`--runner`): this machine, a Ray cluster or a Dask scheduler.

One place for what `copal bench` and `copal run` (several runs) share: parsing the
runner, checking before anything runs that it answers and can hold a task
(`attached`), the flow's task runner, and submitting a task with its resources
(`submit`).

* `local`: Prefect's thread-pool runner in this process (the flow decides whether a
  task runs in this process or in a pool of processes).
* `ray://HOST:PORT`: prefect-ray's RayTaskRunner on an existing Ray cluster (Ray
  Client); each task reserves its resources (num_cpus, memory, num_gpus).
* `dask://HOST:PORT`: prefect-dask's DaskTaskRunner on an existing Dask scheduler;
  each task asks for the abstract worker resources CPU, MEMORY (bytes) and GPU that
  it needs (workers declare them with `--resources`).

On a cluster the workers need copal installed, the same paths (a shared file
system) and a Prefect server (PREFECT_API_URL) to report to.
"""

import asyncio
import logging
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass

from copal.errors import InputError
from copal.grid import Resources

log = logging.getLogger("copal")

RUNNER_FORMS = "local, ray://HOST:PORT or dask://HOST:PORT"
# Passed to Ray workers with the job (Dask workers keep their own environment).
WORKER_ENV = ("PREFECT_API_URL", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM",
              "COPAL_DATA_DIR")
# How long a Dask scheduler has to answer before it is declared not to be one: distributed's
# Client waits forever on a port that accepts the connection but never speaks its protocol.
DASK_ANSWER_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Runner:
    kind: str  # local | ray | dask
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return self.kind if self.kind == "local" else f"{self.kind}://{self.host}:{self.port}"

    @property
    def cluster(self) -> bool:
        return self.kind != "local"


def parse_runner(text: str) -> Runner:
    if text == "local":
        return Runner("local")
    scheme, separator, rest = text.partition("://")
    host, _, port = rest.rpartition(":")
    if scheme not in ("ray", "dask") or not separator or not host or not port.isdigit() or "/" in rest:
        raise InputError(f"--runner {text}: expected {RUNNER_FORMS}")
    return Runner(scheme, host.strip("[]"), int(port))


def check_runner(runner: Runner) -> None:
    """Before anything runs: the cluster answers, and there is a Prefect server its workers can report to."""
    if not runner.cluster:
        return
    from prefect.settings import PREFECT_API_URL

    try:
        socket.create_connection((runner.host, runner.port), timeout=5).close()
    except OSError as error:
        raise InputError(f"--runner {runner}: cannot connect to {runner.host}:{runner.port} "
                         f"({error.strerror or error}); is the {runner.kind} head/scheduler running there?") from None
    url = PREFECT_API_URL.value()
    if not url:
        raise InputError(f"--runner {runner}: the workers need a Prefect server to report to (each would "
                         "otherwise start a temporary one of its own): run `prefect server start --host 0.0.0.0` "
                         "and set PREFECT_API_URL=http://SERVER:4200/api here")
    from urllib.request import urlopen

    try:
        urlopen(url.rstrip("/") + "/health", timeout=10).close()
    except (OSError, ValueError) as error:
        raise InputError(f"PREFECT_API_URL={url}: the Prefect server does not answer ({error})") from None


@contextmanager
def attached(runner: Runner, resources: Resources):
    """Check the runner (it answers, a Prefect server is there, some node or worker can
    hold a task with these resources), connect to Ray if that is the runner, and
    disconnect at the end. Every refusal is one line (InputError), before a flow starts."""
    check_runner(runner)
    if runner.kind == "dask":
        check_dask_resources(runner, resources, dask_identity(runner))
    if runner.kind != "ray":
        yield
        return
    import ray

    connect_ray(runner)  # the flow's RayTaskRunner finds this connection and uses it
    try:
        check_ray_resources(runner, resources)
        yield
    finally:
        ray.shutdown()


def task_runner(runner: Runner, tasks: int):
    """The flow's task runner; `tasks`: how many the local thread pool may run at once."""
    if runner.kind == "ray":
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=f"ray://{runner.host}:{runner.port}", init_kwargs=_ray_init_kwargs())
    if runner.kind == "dask":
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=f"tcp://{runner.host}:{runner.port}")
    from prefect.task_runners import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=max(1, tasks))


def submit(task, runner: Runner, resources: Resources, *arguments):
    """task.submit(*arguments), reserving `resources` on a cluster."""
    if runner.kind == "ray":
        from prefect_ray.context import remote_options

        options = {"num_cpus": resources.cpus or 1, "num_gpus": resources.gpus}
        if resources.memory_gb:
            options["memory"] = int(resources.memory_gb * 2**30)
        with remote_options(**options):
            return task.submit(*arguments)
    if runner.kind == "dask" and _dask_request(resources):
        import dask

        with dask.annotate(resources=_dask_request(resources)):
            return task.submit(*arguments)
    return task.submit(*arguments)


# ----------------------------------------------------------------------------- Ray


def _ray_init_kwargs() -> dict:
    from prefect.settings import PREFECT_API_URL

    env = {name: os.environ[name] for name in WORKER_ENV if os.environ.get(name)}
    env["PREFECT_API_URL"] = PREFECT_API_URL.value()
    return {"runtime_env": {"env_vars": env}, "logging_level": logging.WARNING}


# Ray Client: for each connection the head's proxy forks a server process of its own
# (ray_client_server_PORT). On a busy head that process can die during the fork, before it
# writes a line (gRPC's fork handlers in the multi-threaded proxy, ray-project/ray#63202),
# and ray.init fails with "Starting Ray client server failed". A new connection gets a new
# process, so that failure (and only that) is retried, a bounded number of times.
RAY_CONNECT_ATTEMPTS = 3
RAY_CONNECT_PAUSE_S = 2.0


class _WithoutSigtermWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


_SIGTERM_WARNING = _WithoutSigtermWarning()


def connect_ray(runner: Runner, attempts: int | None = None) -> None:
    """Connect this process to the Ray cluster (Ray Client) before the flow starts; the
    flow's RayTaskRunner then uses this connection. One line (InputError) if it never does."""
    import time

    import ray

    attempts = attempts or RAY_CONNECT_ATTEMPTS
    address = f"ray://{runner.host}:{runner.port}"
    # The head's Ray Client server calls ray.init outside its main thread and warns that it
    # cannot set a SIGTERM handler; the client streams that server log line to this process's
    # stderr (logger ray.util.client.logsclient), where it would break the one-line error
    # contract. A filter, not a level: ray.init's logging setup resets its loggers' levels
    # and handlers, not their filters.
    for name in ("ray.util.client.logsclient", "ray._private.worker"):
        if _SIGTERM_WARNING not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_SIGTERM_WARNING)
    for attempt in range(1, attempts + 1):
        try:
            ray.init(address, **_ray_init_kwargs())
            return
        except Exception as error:  # noqa: BLE001 - the last one becomes the one-line error
            try:
                ray.shutdown()
            except Exception:  # noqa: BLE001
                pass
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            reason = lines[-1] if lines else type(error).__name__
            startup = isinstance(error, ConnectionAbortedError) and "Starting Ray client server failed" in str(error)
            if not startup or attempt == attempts:
                tried = f" ({attempt} attempts)" if attempt > 1 else ""
                raise InputError(f"--runner {runner}: Ray Client did not connect{tried}: {reason}; see "
                                 "ray_client_server*.err in the head's session logs") from None
            log.info("Ray Client connection %d of %d to %s failed (%s); retrying", attempt, attempts, address,
                     reason)
            time.sleep(RAY_CONNECT_PAUSE_S * attempt)


def check_ray_resources(runner: Runner, resources: Resources) -> None:
    """A request that no node can meet would wait forever: fail now instead."""
    import ray

    need = {"CPU": resources.cpus or 1, "memory": (resources.memory_gb or 0) * 2**30, "GPU": resources.gpus}
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if any(all(node.get(key, 0) >= value for key, value in need.items()) for node in nodes):
        return
    have = "; ".join(f"CPU {node.get('CPU', 0):g}, memory {node.get('memory', 0) / 2**30:.1f} GB, "
                     f"GPU {node.get('GPU', 0):g}" for node in nodes) or "no live node"
    raise InputError(f"--runner {runner}: no Ray node can run a task ({describe(resources)}); "
                     f"the nodes have: {have}")


# ----------------------------------------------------------------------------- Dask


def dask_identity(runner: Runner, timeout: float | None = None) -> dict:
    """The scheduler's identity (its workers and their resources included), asked for with
    a deadline; one line if what listens there is not a Dask scheduler."""
    from distributed.comm import connect

    address = f"tcp://{runner.host}:{runner.port}"

    async def identity() -> dict:
        comm = await connect(address)
        try:
            await comm.write({"op": "identity", "reply": True, "n_workers": -1})
            return await comm.read()
        finally:
            comm.abort()

    timeout = timeout or DASK_ANSWER_TIMEOUT_S
    try:
        reply = asyncio.run(asyncio.wait_for(identity(), timeout))
    except (OSError, asyncio.TimeoutError) as error:
        reason = f"no answer within {timeout:g} s" if isinstance(error, asyncio.TimeoutError) else str(error)
        raise InputError(f"--runner {runner}: {address} does not answer as a Dask scheduler ({reason}); "
                         "is `dask scheduler` listening on that port?") from None
    if not isinstance(reply, dict) or reply.get("type") != "Scheduler":
        raise InputError(f"--runner {runner}: {address} is not a Dask scheduler (it answered {str(reply)[:80]})")
    return reply


def _dask_request(resources: Resources) -> dict[str, float]:
    request = {}
    if resources.cpus:
        request["CPU"] = resources.cpus
    if resources.memory_gb:
        request["MEMORY"] = resources.memory_gb * 2**30
    if resources.gpus:
        request["GPU"] = resources.gpus
    return request


def check_dask_resources(runner: Runner, resources: Resources, identity: dict) -> None:
    """A request that no worker declares would wait forever: fail now instead."""
    request = _dask_request(resources)
    workers = list(identity.get("workers", {}).values())
    if workers and any(all(worker.get("resources", {}).get(key, 0) >= value for key, value in request.items())
                       for worker in workers):
        return
    have = "; ".join(f"{worker.get('resources') or 'no resources'}" for worker in workers) or "no worker"
    raise InputError(f"--runner {runner}: no Dask worker can run a task ({describe(resources)}; "
                     f"start workers with --resources "
                     f"\"{','.join(f'{k}={v:g}' for k, v in request.items()) or 'CPU=1'}\"); "
                     f"the workers have: {have}")


def describe(resources: Resources) -> str:
    return (f"cpus {resources.cpus or 1}, memory_gb {resources.memory_gb or 0:g}, "
            f"gpus {resources.gpus:g}")
