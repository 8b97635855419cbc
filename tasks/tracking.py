"""MLflow, for runs and grids: the store, its lock and client (shared), then

* `Tracker`: one parent run per continual run, one child run per step, and a
  registered model version per step that loads back to exactly its weights;
* `GridTracker`: one parent run per bench grid, one child run per finished cell.

The registered model is named `<run name>-<first 8 hex digits of the parent run id>`:
the run's identity, which two runs cannot share, so its version K is step K. Recording a
step is idempotent: a version already registered for the step (a crash before
tracking.json was written) is reused, and a child run a crash left without one is deleted.

A version stores the step's bit-packed masks (plus reconstructed weights where
the method changed them and stored them, or, where they are recomputed, the
accumulated state they are recomputed from: copal's default, sparsegpt under
accumulate) and a pointer to the base checkpoint with its SHA-256, not a copy
of the model: about 1/16 of an fp16 copy for masks alone.

The default store is a SQLite file in the project. SQLite takes one writer at
a time, so writes from concurrent runs are serialised with a file lock.
"""

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from copal.atomic import exclusive_lock
from copal.config import RunConfig
from copal.rundir import RunDir
from copal.errors import InputError
from copal.grid import Cell, cell_dir, cell_metrics
from copal.model import weights_fingerprint
from copal.paths import state_home
from copal.records import RunMetrics
from copal.state import StepState, read_json, write_json

EXPERIMENT = "copal"
# MLflow 3's UI opens an experiment in its GenAI (traces) view unless told it holds model runs.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def tracking_uri(explicit: str | None = None) -> str:
    """`explicit`, else $MLFLOW_TRACKING_URI, else mlflow.db under copal.paths.state_home()
    ($COPAL_HOME or the working directory; MLflow puts artifacts in mlruns/ beside it)."""
    return explicit or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{state_home().resolve() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextmanager
def store_lock(uri: str):
    """Exclusive access to a SQLite tracking store across processes (no-op for servers)."""
    path = _sqlite_path(uri)
    if path is None:
        yield
        return
    with exclusive_lock(path.with_name(path.name + ".lock")):
        yield


def mlflow_client(uri: str):
    """A client of the tracking and registry store at `uri`, its chatter at WARNING."""
    import logging

    from mlflow import MlflowClient

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def copal_experiment(client, uri: str) -> str:
    """The id of the `copal` experiment, created (artifacts beside a SQLite store) if missing."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(EXPERIMENT)
    if experiment:
        for key, value in EXPERIMENT_TAGS.items():
            if experiment.tags.get(key) != value:  # an experiment made before copal tagged it
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    path = _sqlite_path(uri)
    location = (path.parent / "mlruns").as_uri() if path else None
    try:
        return client.create_experiment(EXPERIMENT, artifact_location=location, tags=EXPERIMENT_TAGS)
    except MlflowException:  # created by a concurrent run in between
        return client.get_experiment_by_name(EXPERIMENT).experiment_id


def config_params(config: dict, prefix: str = "") -> list:
    """A config as MLflow params, nested sections flattened to `a.b` names."""
    from mlflow.entities import Param

    flat = []
    for key, value in config.items():
        if isinstance(value, dict):
            flat += config_params(value, f"{prefix}{key}.")
        else:
            flat.append(Param(f"{prefix}{key}", str(value)[:6000]))
    return flat


class Tracker:
    """Records a run directory's steps in MLflow; ids are kept in RUN_DIR/tracking.json."""

    def __init__(self, run_dir: RunDir, uri: str | None = None):
        self.run_dir = run_dir
        self.file = run_dir.root / "tracking.json"
        self.state = read_json(self.file, "tracking record") if self.file.exists() else {}
        self.uri = self.state.get("tracking_uri") or tracking_uri(uri)
        if uri and self.state.get("tracking_uri") not in (None, uri):
            raise InputError(f"{run_dir.root}: recorded in MLflow at {self.state['tracking_uri']}, not {uri}")

    def _save(self) -> None:
        write_json(self.file, self.state)

    def steps(self) -> dict[str, dict]:
        return self.state.get("steps", {})

    def ensure_parent(self, config) -> str:
        """The parent run of this continual run (created once, reused on resume)."""
        if "parent_run_id" in self.state:
            return self.state["parent_run_id"]
        with store_lock(self.uri):
            client = mlflow_client(self.uri)
            experiment_id = copal_experiment(client, self.uri)
            run = client.create_run(experiment_id, run_name=config.name,
                                    tags={"copal.run_dir": str(self.run_dir.root.resolve())})
            client.log_batch(run.info.run_id, params=config_params(config.model_dump()))
        self.state.update({"tracking_uri": self.uri, "experiment_id": experiment_id,
                           "parent_run_id": run.info.run_id, "model_name": f"{config.name}-{run.info.run_id[:8]}",
                           "steps": {}})
        self._save()
        return run.info.run_id

    def finish_parent(self) -> None:
        """Mark the parent run finished; a later `copal step` adds children to it again."""
        with store_lock(self.uri):
            mlflow_client(self.uri).set_terminated(self.state["parent_run_id"], "FINISHED")

    def record_step(self, state: StepState, metrics: RunMetrics, config, plot_png: bytes | None = None) -> dict:
        """A child run with the step's params, metrics and artifacts, and a new
        version of the registered model. Idempotent per step."""
        from mlflow.entities import Metric, Param

        key = str(state.id)
        if key in self.steps():
            return self.steps()[key]
        parent = self.ensure_parent(config)
        record = state.record
        params = {"domain": record.domain, "source": record.source, "fingerprint": record.fingerprint,
                  "method": record.method, "regime": record.regime, "structure": record.structure,
                  "sparsity": record.sparsity_target, "seed": record.seed,
                  "code_revision": record.code_revision, "parent_step": record.parent}
        values = {f"ppl.{name}": value for name, value in record.ppl.items()}
        values.update({"sparsity": record.sparsity, "seconds": record.seconds,
                       "prune_seconds": record.prune_seconds, "peak_rss_mb": record.peak_rss_mb})
        if metrics.bwt is not None:
            values["bwt"] = metrics.bwt
        values["avg_ppl"] = metrics.avg_ppl
        values.update(_task_metrics(record.tasks or {}))
        params.update({f"task_items/{task}/{key}": value for task, items in (record.task_items or {}).items()
                       for key, value in items.items()})
        with tempfile.TemporaryDirectory() as scratch, store_lock(self.uri):
            client = mlflow_client(self.uri)
            found = self._registered(client, key)
            if found is not None:
                run_id, version = found
                self._delete_unregistered(client, parent, key, keep=run_id)
                client.set_terminated(run_id)
            else:
                self._delete_unregistered(client, parent, key)
                model_dir = _model_artifact(state, config, Path(scratch) / "model")
                run = client.create_run(self.state["experiment_id"], run_name=f"step {state.id}: {record.domain}",
                                        tags={"mlflow.parentRunId": parent, "copal.step": key})
                run_id = run.info.run_id
                client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()],
                                 metrics=[Metric(k, float(v), 0, record.index) for k, v in values.items()])
                client.log_artifacts(run_id, str(model_dir), "model")
                if (state.folder / "sensitivity").is_dir():
                    client.log_artifacts(run_id, str(state.folder / "sensitivity"), "sensitivity")
                if plot_png:
                    (Path(scratch) / "ppl_matrix.png").write_bytes(plot_png)
                    client.log_artifact(run_id, str(Path(scratch) / "ppl_matrix.png"))
                version = self._register(client, run_id, state)
                client.set_terminated(run_id)  # FINISHED: complete, with its model version
            if self.run_dir.dense_tasks_path.exists() and not self.state.get("dense_tasks_logged"):
                # The dense model's task accuracies (evaluation.tasks), once, on the parent run.
                dense = read_json(self.run_dir.dense_tasks_path, "dense task accuracies").get("tasks", {})
                client.log_batch(parent, metrics=[Metric(k, float(v), 0, 0)
                                                  for k, v in _task_metrics(dense, "dense/").items()])
                self.state["dense_tasks_logged"] = True
        self.state.setdefault("steps", {})[key] = {"run_id": run_id, "model_version": version}
        self._save()
        return self.state["steps"][key]

    def _registered(self, client, key: str) -> tuple[str, str] | None:
        """(run id, version) of the model version already registered for step `key`, if any."""
        from mlflow.exceptions import MlflowException

        try:
            versions = client.search_model_versions(f"name = '{self.state['model_name']}'")
        except MlflowException:
            return None
        for version in versions:
            if version.tags.get("copal.step") == key:
                return version.run_id, str(version.version)
        return None

    def _delete_unregistered(self, client, parent: str, key: str, keep: str | None = None) -> None:
        """Child runs of step `key` that interrupted attempts left without a model version
        (all but `keep`, the one that has it)."""
        for run in client.search_runs([self.state["experiment_id"]],
                                      f"tags.mlflow.parentRunId = '{parent}' and tags.`copal.step` = '{key}'"):
            if run.info.run_id != keep:
                client.delete_run(run.info.run_id)

    def _register(self, client, run_id: str, state: StepState) -> str:
        from mlflow.exceptions import MlflowException

        name = self.state["model_name"]
        try:
            client.create_registered_model(name)
        except MlflowException:
            pass  # it exists (another step or run made it)
        version = client.create_model_version(name, source=f"runs:/{run_id}/model", run_id=run_id,
                                              tags={"copal.step": str(state.id),
                                                    "copal.run_dir": str(self.run_dir.root.resolve())})
        return str(version.version)


def _task_metrics(tasks: dict[str, dict[str, float]], prefix: str = "") -> dict[str, float]:
    """`task/<task>/<metric>` for each task accuracy (copal.lm_eval_tasks' metric names)."""
    return {f"{prefix}task/{task}/{metric}": value for task, values in tasks.items()
            for metric, value in values.items()}


def _model_artifact(state: StepState, config, folder: Path) -> Path:
    """What a registered version holds: masks (+ weights, or the accumulated state they
    are recomputed from), step.json, base.json."""
    folder.mkdir(parents=True)
    for name in ("masks.safetensors", "step.json"):
        shutil.copy(state.folder / name, folder / name)
    if (state.folder / "weights").is_dir():
        shutil.copytree(state.folder / "weights", folder / "weights")
    elif state.record.reweight:  # weights recomputed from W0, the mask and this state (copal.state)
        shutil.copytree(state.folder / "sensitivity", folder / "sensitivity")
    base = {"model": str(Path(config.model).resolve()) if Path(config.model).exists() else config.model,
            "dtype": config.dtype, "weights_sha256": weights_fingerprint(config.model)}
    (folder / "base.json").write_text(json.dumps(base, indent=1) + "\n")
    return folder


def load_model_version(name: str, version: str | int, uri: str | None = None):
    """(model, tokenizer) of a registered version: exactly that step's weights.

        from tasks.tracking import load_model_version
        model, tokenizer = load_model_version("demo", 3)
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from copal.export import load_with_step

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=scratch))
        except MlflowException as error:
            raise InputError(f"models:/{name}/{version}: {str(error).splitlines()[0]}") from None
        base = json.loads((local / "base.json").read_text())
        if base["weights_sha256"] and weights_fingerprint(base["model"]) != base["weights_sha256"]:
            raise InputError(f"{base['model']}: base weights changed since version {version} was recorded")
        return load_with_step(base["model"], StepState(local), base["dtype"])


class GridTracker:
    """One MLflow parent run for the grid and a child run per finished cell (its
    metrics, read from the cell's metrics.json); ids are kept in OUT/tracking.json,
    so a resumed grid adds to the same parent and logs each cell once."""

    def __init__(self, out_dir: Path, uri: str | None = None):
        self.file = Path(out_dir) / "tracking.json"
        self.out_dir = Path(out_dir)
        self.state = read_json(self.file, "tracking record") if self.file.exists() else {}
        recorded = self.state.get("tracking_uri")
        if uri and recorded not in (None, uri):
            raise InputError(f"{out_dir}: this grid is recorded in MLflow at {recorded}, not {uri}")
        self.uri = recorded or tracking_uri(uri)

    def _save(self) -> None:
        write_json(self.file, self.state)

    @property
    def parent(self) -> str | None:
        return self.state.get("parent_run_id")

    def cells(self) -> dict[str, str]:
        return self.state.get("cells", {})

    def ensure_parent(self, base: RunConfig, quick: bool) -> str:
        if self.parent:
            return self.parent
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with store_lock(self.uri):
            client = mlflow_client(self.uri)
            experiment_id = copal_experiment(client, self.uri)
            run = client.create_run(experiment_id, run_name=f"bench {self.out_dir.resolve().name}",
                                    tags={"copal.bench_dir": str(self.out_dir.resolve()),
                                          "copal.quick": str(quick).lower()})
            client.log_batch(run.info.run_id, params=config_params(base.model_dump()))
        self.state = {"tracking_uri": self.uri, "experiment_id": experiment_id,
                      "parent_run_id": run.info.run_id, "cells": {}}
        self._save()
        return run.info.run_id

    def log_cell(self, cell: Cell, runner) -> str:
        """The cell's child run (idempotent): params, final metrics, per-step timings, metrics.json;
        `runner`: where the grid ran (recorded as its str)."""
        if cell.id in self.cells():
            return self.cells()[cell.id]
        from mlflow.entities import Metric, Param

        metrics = cell_metrics(self.out_dir, cell)
        params = {"method": cell.method, "regime": cell.regime, "structure": cell.structure,
                  "sparsity": cell.sparsity, "variant": cell.variant or "default", "runner": str(runner)}
        values = [Metric("avg_ppl", float(metrics.avg_ppl), 0, 0)]
        if metrics.bwt is not None:
            values.append(Metric("bwt", float(metrics.bwt), 0, 0))
        for domain, ppl in zip(metrics.domains, metrics.ppl[-1]):
            if ppl is not None:
                values.append(Metric(f"ppl.{domain}", float(ppl), 0, 0))
        for index, step in enumerate(metrics.steps):
            values += [Metric("seconds", float(step.seconds), 0, index),
                       Metric("prune_seconds", float(step.prune_seconds), 0, index),
                       Metric("peak_rss_mb", float(step.peak_rss_mb), 0, index)]
        with store_lock(self.uri):
            client = mlflow_client(self.uri)
            run = client.create_run(self.state["experiment_id"], run_name=cell.id,
                                    tags={"mlflow.parentRunId": self.parent, "copal.cell": cell.id,
                                          "copal.run_dir": str(cell_dir(self.out_dir, cell).resolve())})
            client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in params.items()], metrics=values)
            client.log_artifact(run.info.run_id, str(cell_dir(self.out_dir, cell) / "metrics.json"))
            client.set_terminated(run.info.run_id)
        self.state.setdefault("cells", {})[cell.id] = run.info.run_id
        self._save()
        return run.info.run_id

    def finish(self, files: list[Path], failed: bool) -> None:

        with store_lock(self.uri):
            client = mlflow_client(self.uri)
            for file in files:
                client.log_artifact(self.parent, str(file))
            client.set_terminated(self.parent, "FAILED" if failed else "FINISHED")
