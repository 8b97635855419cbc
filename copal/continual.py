"""A continual run: one pruning step per domain, recorded in a run directory.

    RUN_DIR/config.yaml     the resolved config, with each domain's data fingerprint
    RUN_DIR/dense.json      PPL of the dense model per domain (row 0 of the matrix)
    RUN_DIR/steps/K/        what step K recorded (see copal.state)
    RUN_DIR/HEAD            the current step id
    RUN_DIR/metrics.json    PPL matrix, BWT, average PPL, per-step cost

Steps have ids 1, 2, … in the order they were made and a `parent` (the step
they continued from), so a rollback can make an older step the head again
without deleting later ones. The PPL matrix follows the lineage of HEAD.

This module is orchestration-free: the command line and the Prefect tasks call
`ContinualRun` methods; nothing here knows about Prefect, MLflow or DVC.
"""

import logging
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from copal import masks as maskio
from copal import metrics
from copal.config import RunConfig, build_config
from copal.data import Domain, calibration_samples, evaluation_windows, ingest, parse_source
from copal.errors import InputError
from copal.masks import Structure
from copal.methods import build_method
from copal.model import (DenseWeights, all_prunable, check_architecture, load_model, load_tokenizer, resolve_device,
                         set_weight_matrix)
from copal.regimes import REGIMES
from copal.step import prune_step
from copal.state import StepState, StepWriter, read_json, write_json

log = logging.getLogger("copal")

Progress = Callable[[str, int, int], None]

# Keys that may differ between two invocations of the same run.
_RUNTIME_KEYS = ("device",)


def _code_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunDir:
    """The files of one run directory."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.config_path = self.root / "config.yaml"
        self.steps_dir = self.root / "steps"
        self.head_path = self.root / "HEAD"
        self.metrics_path = self.root / "metrics.json"
        self.dense_path = self.root / "dense.json"
        self.dense_tasks_path = self.root / "dense_tasks.json"

    def exists(self) -> bool:
        return self.config_path.is_file()

    def require(self) -> "RunDir":
        if not self.root.is_dir():
            raise InputError(f"{self.root}: run directory not found")
        if not self.exists():
            raise InputError(f"{self.root}: not a run directory (no config.yaml)")
        return self

    def read_config(self) -> tuple[RunConfig, dict[str, str]]:
        try:
            raw = yaml.safe_load(self.config_path.read_text())
        except yaml.YAMLError:
            raise InputError(f"{self.config_path}: corrupt run config (not valid YAML)") from None
        if not isinstance(raw, dict):
            raise InputError(f"{self.config_path}: corrupt run config")
        fingerprints = raw.pop("fingerprints", {}) or {}
        return build_config(raw, str(self.config_path)), fingerprints

    def write_config(self, config: RunConfig, fingerprints: dict[str, str]) -> None:
        payload = config.model_dump() | {"fingerprints": fingerprints}
        partial = self.config_path.with_name(".config.yaml.partial")
        partial.write_text(yaml.safe_dump(payload, sort_keys=False))
        partial.replace(self.config_path)

    def head(self) -> int:
        if not self.head_path.exists():
            return 0
        text = self.head_path.read_text().strip()
        if not text.isdigit():
            raise InputError(f"{self.head_path}: corrupt HEAD ({text!r})")
        return int(text)

    def set_head(self, step_id: int) -> None:
        partial = self.head_path.with_name(".HEAD.partial")
        partial.write_text(f"{step_id}\n")
        partial.replace(self.head_path)

    def step_ids(self) -> list[int]:
        if not self.steps_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.steps_dir.iterdir() if p.name.isdigit())

    def step(self, step_id: int) -> StepState:
        folder = self.steps_dir / str(step_id)
        if not folder.is_dir():
            known = self.step_ids()
            span = f"recorded steps: {known[0]}..{known[-1]}" if known else "no steps recorded yet"
            raise InputError(f"{self.root}: no step {step_id} ({span})")
        return StepState(folder)

    def lineage(self, head: int | None = None) -> list[StepState]:
        """Steps from the first to `head` (default HEAD), following parents."""
        chain = []
        step_id = self.head() if head is None else head
        while step_id:
            state = self.step(step_id)
            chain.append(state)
            step_id = state.record["parent"]
        return chain[::-1]


def _same_run(recorded: RunConfig, wanted: RunConfig) -> str | None:
    """None if `wanted` continues the recorded run, else what differs."""
    old, new = recorded.model_dump(), wanted.model_dump()
    for key in old:
        if key in _RUNTIME_KEYS or key == "domains":
            continue
        if old[key] != new[key]:
            return f"{key}: {old[key]!r} recorded, {new[key]!r} given"
    shorter = min(len(old["domains"]), len(new["domains"]))
    if old["domains"][:shorter] != new["domains"][:shorter]:
        return f"domains: {old['domains']} recorded, {new['domains']} given"
    return None


@dataclass
class PendingStep:
    """A step being computed: where it writes, what it continues from, its clock."""

    domain_index: int
    step_id: int
    parent: StepState | None
    writer: StepWriter
    memory: metrics.PeakMemory
    started: float
    batches: list[torch.Tensor] | None = None
    prune_seconds: float = 0.0
    tasks: dict | None = None  # evaluation.tasks' results: {"tasks": …, "task_items": …}


def reconcile(run_dir: RunDir, config: RunConfig) -> tuple[RunConfig, dict[str, str]]:
    """The config to run in `run_dir` (with any domains the run added) and the
    recorded fingerprints; an error if the directory holds another run."""
    if run_dir.exists():
        recorded, fingerprints = run_dir.read_config()
        difference = _same_run(recorded, config)
        if difference:
            raise InputError(f"{run_dir.root}: holds a run of another config ({difference})")
        if len(recorded.domains) > len(config.domains):
            config = config.model_copy(update={"domains": recorded.domains})
        return config, fingerprints
    if run_dir.root.exists() and any(run_dir.root.iterdir()):
        raise InputError(f"{run_dir.root}: exists and is not a run directory; choose an empty or new --out")
    return config, {}


def _duplicate_name(spec: str, name: str) -> str:
    return f"{spec}: another domain is already named {name!r}; name it NAME={spec}"


def preflight(config: RunConfig, root: Path, new_specs: tuple[str, ...] = (), data_dir: Path | None = None) -> None:
    """Check every input of a run (directory, model files, data, lengths) without
    loading the model, so bad input fails in seconds, before any orchestration."""
    run_dir = RunDir(root)
    config, fingerprints = reconcile(run_dir, config)
    if run_dir.head():
        run_dir.step(run_dir.head()).verify()
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    check_architecture(config.model, config.trust_remote_code)
    cal, ev = config.calibration, config.evaluation
    names: set[str] = set()
    for spec in list(config.domains) + [spec for spec in new_specs if spec not in config.domains]:
        name = parse_source(spec).name
        if name in names:
            raise InputError(_duplicate_name(spec, name))
        names.add(name)
        domain = ingest(spec, data_dir)
        if fingerprints.get(domain.name, domain.fingerprint) != domain.fingerprint:
            raise InputError(f"{spec}: data changed since the run recorded it "
                             f"(fingerprint {domain.fingerprint}, recorded {fingerprints[domain.name]})")
        calibration_samples(domain, tokenizer, cal.nsamples, cal.seqlen, cal.seed)
        evaluation_windows(domain, tokenizer, ev.seqlen, ev.max_tokens)
    if ev.tasks:
        from copal.tasks import check_tasks

        check_tasks(ev.tasks, ev.task_include_path)


class ContinualRun:
    """One process's view of a run: the model in memory, the run directory on disk.

    `step(i)` = `start_step` → `calibrate` → `prune` → `evaluate` → `finish_step`;
    the Prefect flow calls the same pieces as separate tasks."""

    def __init__(self, config: RunConfig, root: Path, progress: Progress | None = None,
                 data_dir: Path | None = None, readonly: bool = False, known_dense: dict[str, float] | None = None):
        """`known_dense`: dense PPLs measured elsewhere under this same model and
        evaluation setting (the benchmark's cells share one), used instead of
        measuring them again."""
        self.dir = RunDir(root)
        self.known_dense = dict(known_dense or {})
        self.progress = progress or (lambda what, done, total: None)
        self.data_dir = data_dir
        self.readonly = readonly
        self.device = resolve_device(config.device)
        config, self.fingerprints = reconcile(self.dir, config)
        self.config = config
        self.domains: list[Domain] = []
        self.model, self.tokenizer = load_model(config.model, config.dtype, config.trust_remote_code)
        self.dense = DenseWeights(self.model, config.model)
        self.method = build_method(config)
        self.regime = REGIMES[config.regime]
        self.structure = Structure(config.sparsity, config.n_m, config.mask_scope)
        self._windows: dict[str, torch.Tensor] = {}
        self._samples: dict[str, torch.Tensor] = {}
        for spec in config.domains:
            self._add(spec)
        self._save_config()

    def _add(self, spec: str) -> Domain:
        domain = ingest(spec, self.data_dir)
        if any(known.name == domain.name for known in self.domains):
            raise InputError(_duplicate_name(spec, domain.name))
        recorded = self.fingerprints.get(domain.name)
        if recorded is not None and recorded != domain.fingerprint:
            raise InputError(f"{spec}: data changed since the run recorded it "
                             f"(fingerprint {domain.fingerprint}, recorded {recorded})")
        self.samples(domain)  # fail on a too-short domain now, not after hours of work
        self.windows(domain)
        self.domains.append(domain)
        self.fingerprints[domain.name] = domain.fingerprint
        return domain

    def _save_config(self) -> None:
        if not self.readonly:
            self.dir.root.mkdir(parents=True, exist_ok=True)
            self.dir.write_config(self.config, {d.name: d.fingerprint for d in self.domains})

    def domain_index(self, spec: str) -> int:
        """Index of the domain `spec` names, appended to the run's domains if new."""
        for index, domain in enumerate(self.domains):
            if domain.source.spec == spec:
                return index
        self._add(spec)
        self.config = self.config.model_copy(update={"domains": self.config.domains + [spec]})
        self._save_config()
        return len(self.domains) - 1

    # ------------------------------------------------------------------ evaluation

    def samples(self, domain: Domain) -> torch.Tensor:
        if domain.name not in self._samples:
            cal = self.config.calibration
            self._samples[domain.name] = calibration_samples(domain, self.tokenizer, cal.nsamples, cal.seqlen,
                                                             cal.seed)
        return self._samples[domain.name]

    def windows(self, domain: Domain) -> torch.Tensor:
        if domain.name not in self._windows:
            ev = self.config.evaluation
            self._windows[domain.name] = evaluation_windows(domain, self.tokenizer, ev.seqlen, ev.max_tokens)
        return self._windows[domain.name]

    def seen_domains(self, pending: PendingStep) -> list[Domain]:
        """The domains `pending`'s lineage has stepped on before it, in run order."""
        names = {state.record["domain"] for state in self.dir.lineage(pending.parent.id)} if pending.parent else set()
        return [domain for domain in self.domains if domain.name in names]

    def evaluated_domains(self, pending: PendingStep | None) -> list[Domain]:
        """Every domain of the run, or with `evaluation.domains: seen` only those
        that `pending`'s lineage has calibrated on, its own included."""
        if self.config.evaluation.domains == "all" or pending is None:
            return list(self.domains)
        chosen = self.seen_domains(pending) + [self.domains[pending.domain_index]]
        return [domain for domain in self.domains if domain in chosen]

    def evaluate(self, pending: PendingStep | None = None) -> dict[str, dict]:
        """PPL of the model as it is now, on the domains `evaluated_domains` names."""
        chosen = self.evaluated_domains(pending)
        results = {}
        for index, domain in enumerate(chosen):
            self.progress("evaluate", index, len(chosen))
            ppl, tokens = metrics.perplexity(self.model, self.windows(domain), self.device,
                                             self.config.evaluation.batch_size)
            results[domain.name] = {"ppl": ppl, "tokens": tokens}
        self.progress("evaluate", len(chosen), len(chosen))
        if pending is not None and self.config.evaluation.tasks:
            pending.tasks = self.evaluate_tasks()
        return results

    def evaluate_tasks(self) -> dict:
        """evaluation.tasks (lm-eval) on the model as it is now: {"tasks", "task_items"}."""
        from copal.tasks import evaluate_tasks

        ev = self.config.evaluation
        self.progress("evaluate tasks", 0, 1)
        results = evaluate_tasks(self.model, self.tokenizer, ev.tasks, ev.task_include_path, self.device,
                                 ev.batch_size, ev.task_limit)
        self.progress("evaluate tasks", 1, 1)
        return results

    def dense_ppl(self) -> dict[str, float]:
        """Row 0 of the PPL matrix, computed once per domain and kept in dense.json."""
        recorded = read_json(self.dir.dense_path, "dense PPLs") if self.dir.dense_path.exists() else {}
        known = {d.name: self.known_dense[d.name] for d in self.domains
                 if d.name not in recorded and d.name in self.known_dense}
        missing = [d for d in self.domains if d.name not in recorded and d.name not in known]
        recorded |= known
        tasks_missing = bool(self.config.evaluation.tasks) and not self.dir.dense_tasks_path.exists()
        if missing or tasks_missing:  # the model in memory may be pruned: W0 back, once
            for name, module in all_prunable(self.model).items():
                set_weight_matrix(module, self.dense.get(name))
        if missing:
            for index, domain in enumerate(missing):
                self.progress("evaluate dense", index, len(missing))
                recorded[domain.name] = metrics.perplexity(self.model, self.windows(domain), self.device,
                                                           self.config.evaluation.batch_size)[0]
        if missing or known:
            write_json(self.dir.dense_path, recorded)
        if tasks_missing:
            write_json(self.dir.dense_tasks_path, self.evaluate_tasks())
        return {d.name: recorded[d.name] for d in self.domains}

    # ------------------------------------------------------------------ one step

    def start_step(self, domain_index: int, parent_id: int | None = None,
                   steps_dir: Path | None = None) -> PendingStep:
        """Open a step on `self.domains[domain_index]` continuing from `parent_id` (default HEAD)."""
        parent_id = self.dir.head() if parent_id is None else parent_id
        parent = self.dir.step(parent_id) if parent_id else None
        step_id = max(self.dir.step_ids(), default=0) + 1
        writer = StepWriter(steps_dir or self.dir.steps_dir, step_id)
        memory = metrics.PeakMemory()
        return PendingStep(domain_index, step_id, parent, writer, memory, time.perf_counter())

    def calibrate(self, pending: PendingStep) -> None:
        """The step's calibration sequences, from the domains its regime chooses."""
        current = self.domains[pending.domain_index]
        chosen = self.regime.calibration_domains(current, self.seen_domains(pending))
        samples = torch.cat([self.samples(d) for d in chosen])
        pending.batches = list(samples.split(self.config.calibration.batch_size))

    def prune(self, pending: PendingStep) -> None:
        """Update the statistic and apply masks, block by block, in place."""
        start = time.perf_counter()
        prune_step(self.model, pending.batches, self.method, self.regime, self.structure, self.dense,
                   pending.parent, pending.writer, self.device,
                   progress=lambda done, total: self.progress("prune blocks", done, total))
        pending.prune_seconds = time.perf_counter() - start

    def finish_step(self, pending: PendingStep, evaluation: dict[str, dict]) -> dict:
        """Write the step whole, make it HEAD, refresh metrics.json."""
        domain = self.domains[pending.domain_index]
        record = {
            "step": pending.step_id, "parent": pending.parent.id if pending.parent else 0,
            "index": (pending.parent.record["index"] if pending.parent else 0) + 1,
            "domain": domain.name, "source": domain.source.spec, "fingerprint": domain.fingerprint,
            "method": self.config.method, "regime": self.config.regime, "structure": self.config.structure,
            "sparsity_target": self.config.sparsity, "seed": self.config.calibration.seed,
            "code_revision": _code_revision(),
            "ppl": {name: result["ppl"] for name, result in evaluation.items()},
            "eval_tokens": {name: result["tokens"] for name, result in evaluation.items()},
            "sparsity": pending.writer.overall_sparsity(), "layer_sparsity": pending.writer.layer_sparsity(),
            "prune_seconds": pending.prune_seconds, "seconds": time.perf_counter() - pending.started,
            "peak_rss_mb": pending.memory.peak_mb,
        }
        if pending.tasks is not None:
            record |= pending.tasks
        pending.writer.commit(record)
        self.dir.set_head(pending.step_id)
        self.write_metrics()
        return record

    def step(self, domain_index: int) -> dict:
        """One whole step on `self.domains[domain_index]`, continuing from HEAD."""
        pending = self.start_step(domain_index)
        self.calibrate(pending)
        self.prune(pending)
        return self.finish_step(pending, self.evaluate(pending))

    # ------------------------------------------------------------------ the whole run

    def remaining(self) -> list[int]:
        """Indices of the run's domains that HEAD's lineage has not stepped on yet."""
        done = {state.record["domain"] for state in self.dir.lineage()}
        return [index for index, domain in enumerate(self.domains) if domain.name not in done]

    def run(self, step: Callable[[int], dict] | None = None) -> dict:
        """Step through every pending domain in order; recorded steps are kept as they are."""
        step = step or self.step
        self.dense_ppl()
        for state in self.dir.lineage():
            log.info("step %d (%s) already recorded; not recomputed", state.id, state.record["domain"])
        for index in self.remaining():
            log.info("step on domain %d/%d: %s", index + 1, len(self.domains), self.domains[index].name)
            step(index)
        return self.write_metrics()

    def replay(self, step_id: int) -> list[str]:
        """Recompute a recorded step from its parent and data; the layers whose masks differ."""
        import tempfile

        state = self.dir.step(step_id)
        names = [d.name for d in self.domains]
        index = names.index(state.record["domain"])
        if self.domains[index].fingerprint != state.record["fingerprint"]:
            raise InputError(f"{self.domains[index].source.spec}: data changed since step {step_id} "
                             f"(fingerprint {self.domains[index].fingerprint}, recorded {state.record['fingerprint']})")
        recorded = {name: state.mask(name) for name in state.mask_names()}
        with tempfile.TemporaryDirectory() as scratch:
            pending = self.start_step(index, parent_id=state.record["parent"], steps_dir=Path(scratch))
            self.calibrate(pending)
            self.prune(pending)
            return [name for name, packed in pending.writer.packed_masks.items()
                    if name not in recorded or not torch.equal(maskio.unpack(packed, recorded[name].shape),
                                                               recorded[name])] + \
                   [name for name in recorded if name not in pending.writer.packed_masks]

    def write_metrics(self) -> dict:
        payload = summarize(self.dir, self.config)
        write_json(self.dir.metrics_path, payload)
        return payload


def summarize(run_dir: RunDir, config: RunConfig, head: int | None = None) -> dict:
    """metrics.json's content, derived from the records of the lineage of `head`
    (default HEAD). Columns: the lineage's domains in step order, then the run's
    other domains."""
    lineage = [state.record for state in run_dir.lineage(head)]
    dense = read_json(run_dir.dense_path, "dense PPLs") if run_dir.dense_path.exists() else {}
    names = list(dict.fromkeys([record["domain"] for record in lineage] + list(dense)))
    matrix = [[record["ppl"].get(name) for name in names] for record in lineage]
    step_columns = [names.index(record["domain"]) for record in lineage]
    return {
        "model": config.model, "method": config.method, "regime": config.regime,
        "structure": config.structure, "sparsity": config.sparsity, "seqlen": config.evaluation.seqlen,
        "domains": names, "dense_ppl": [dense.get(name) for name in names],
        "ppl": matrix, "bwt": metrics.bwt(matrix, step_columns),
        "avg_ppl": metrics.average_ppl(matrix, step_columns),
        "steps": [{"step": r["step"], "domain": r["domain"], "seconds": r["seconds"],
                   "prune_seconds": r["prune_seconds"], "peak_rss_mb": r["peak_rss_mb"],
                   "sparsity": r["sparsity"]} | ({"tasks": r.get("tasks")} if config.evaluation.tasks else {})
                  for r in lineage],
    } | _dense_tasks(run_dir, config)


def _dense_tasks(run_dir: RunDir, config: RunConfig) -> dict:
    """metrics.json's `dense_tasks` (task accuracies of the dense model), only for a
    run with evaluation.tasks."""
    if not config.evaluation.tasks:
        return {}
    dense = read_json(run_dir.dense_tasks_path, "dense task accuracies") if run_dir.dense_tasks_path.exists() else {}
    return {"dense_tasks": dense.get("tasks")}
