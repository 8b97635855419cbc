"""A continual run: one pruning step per domain, recorded in a run directory
(copal.rundir), on the domains of copal.domains.

This module is orchestration-free: the command line and the Prefect tasks call
`ContinualRun` methods; nothing here knows about Prefect, MLflow or DVC.
"""

import logging
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from copal import masks as maskio
from copal import metrics
from copal.config import RunConfig
from copal.data import Domain
from copal.domains import RunDomains
from copal.errors import EnvironmentFault, InputError
from copal.masks import Structure
from copal.methods import build_method
from copal.environment import differences, environment
from copal.model import (DTYPES, DenseWeights, all_prunable, check_architecture, load_model, load_tokenizer,
                         resolve_device, set_weight_matrix, torch_threads)
from copal.progress import Progress
from copal.regimes import REGIMES
from copal.replay import ReplayResult
from copal.rundir import RunDir, reconcile, summarize
from copal.state import CODECS, StepState, StepWriter, read_json, write_json
from copal.step import prune_step
from copal.streaming import load_streaming
from copal.tokens import TextStart

log = logging.getLogger("copal")


def _code_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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


def preflight(config: RunConfig, root: Path, new_specs: tuple[str, ...] = (), data_dir: Path | None = None) -> None:
    """Check every input of a run (directory, model files, data, lengths) without
    loading the model, so bad input fails in seconds, before any orchestration."""
    run_dir = RunDir(root)
    config, fingerprints = reconcile(run_dir, config)
    run_dir.check_unlocked()
    run_dir.check_records()
    if run_dir.head():
        run_dir.step(run_dir.head()).verify()
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    check_architecture(config.model, config.trust_remote_code)
    domains = RunDomains(config, tokenizer, fingerprints, data_dir)
    for spec in list(config.domains) + [spec for spec in new_specs if spec not in config.domains]:
        domains.add(spec)
    if config.evaluation.tasks:
        from copal.lm_eval_tasks import check_tasks

        check_tasks(config.evaluation.tasks, config.evaluation.task_include_path)


class ContinualRun:
    """One process's view of a run: the model in memory, the run directory on disk.

    `step(i)` = `start_step` → `calibrate` → `prune` → `evaluate` → `finish_step`;
    the Prefect flow calls the same pieces as separate tasks."""

    def __init__(self, config: RunConfig, root: Path, progress: Progress | None = None,
                 data_dir: Path | None = None, readonly: bool = False, known_dense: dict[str, float] | None = None,
                 streaming: bool | None = None):
        """`known_dense`: dense PPLs measured elsewhere under this same model and
        evaluation setting (the benchmark's cells share one), used instead of
        measuring them again.

        `streaming` (None: wherever possible): keep only the non-block tensors in
        memory and read each block from the checkpoint when the pass or the
        evaluation reaches it (copal.streaming). Not possible for a method with a
        whole-model statistic, with `evaluation.tasks` (lm-eval runs the whole
        model), or a checkpoint whose block tensors are not found under the
        model's names (a hub id, renamed keys); those keep the model resident."""
        self.dir = RunDir(root)
        self.known_dense = dict(known_dense or {})
        self.progress = progress or (lambda what, done, total: None)
        self.readonly = readonly
        self.device = resolve_device(config.device)
        config, fingerprints = reconcile(self.dir, config)
        self.config = config
        self.method = build_method(config)
        self.stream = None
        loaded = None
        if streaming is not False and not self.method.whole_model and not config.evaluation.tasks:
            loaded = load_streaming(config.model, DTYPES[config.dtype], config.trust_remote_code)
        if loaded is not None:
            self.model, self.tokenizer, self.stream = loaded
        else:
            self.model, self.tokenizer = load_model(config.model, config.dtype, config.trust_remote_code)
        self.dense = DenseWeights(self.model, config.model)
        self.regime = REGIMES[config.regime]
        self.structure = Structure(config.sparsity, config.n_m, config.mask_scope)
        self.domains = RunDomains(config, self.tokenizer, fingerprints, data_dir)
        for spec in config.domains:
            self.domains.add(spec)
        self._save_config()

    def _save_config(self) -> None:
        if not self.readonly:
            self.dir.root.mkdir(parents=True, exist_ok=True)
            self.dir.write_config(self.config, self.domains.fingerprints())

    def domain_index(self, spec: str) -> int:
        """Index of the domain `spec` names, appended to the run's domains if new."""
        index = self.domains.index(spec)
        if index is not None:
            return index
        self.domains.add(spec)
        self.config = self.config.model_copy(update={"domains": self.config.domains + [spec]})
        self._save_config()
        return len(self.domains) - 1

    # ------------------------------------------------------------------ evaluation

    def seen_domains(self, pending: PendingStep) -> list[Domain]:
        """The domains `pending`'s lineage has stepped on before it, in run order."""
        lineage = self.dir.lineage(pending.parent.id) if pending.parent else []
        return self.domains.named(state.record["domain"] for state in lineage)

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
            ppl, tokens = metrics.perplexity(self.model, self.domains.windows(domain), self.device,
                                             self.config.evaluation.batch_size, self.stream)
            results[domain.name] = {"ppl": ppl, "tokens": tokens}
        self.progress("evaluate", len(chosen), len(chosen))
        if pending is not None and self.config.evaluation.tasks:
            pending.tasks = self.evaluate_tasks()
        return results

    def evaluate_tasks(self) -> dict:
        """evaluation.tasks (lm-eval) on the model as it is now: {"tasks", "task_items"}."""
        from copal.lm_eval_tasks import evaluate_tasks

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
        if (missing or tasks_missing) and self.stream is None:  # the model in memory may be pruned: W0 back, once
            for name, module in all_prunable(self.model).items():
                set_weight_matrix(module, self.dense.get(name))
        if self.stream is not None:
            self.stream.weights = None  # the checkpoint's own weights: W0
        if missing:
            for index, domain in enumerate(missing):
                self.progress("evaluate dense", index, len(missing))
                recorded[domain.name] = metrics.perplexity(self.model, self.domains.windows(domain), self.device,
                                                           self.config.evaluation.batch_size, self.stream)[0]
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
        if parent is not None:
            parent.verify()
        step_id = max(self.dir.step_ids(), default=0) + 1
        steps_dir = steps_dir or self.dir.steps_dir
        check_free_space(steps_dir, self.expected_step_bytes(parent))
        writer = StepWriter(steps_dir, step_id, self.config.state.format)
        memory = metrics.PeakMemory()
        return PendingStep(domain_index, step_id, parent, writer, memory, time.perf_counter())

    def expected_step_bytes(self, parent: StepState | None) -> int:
        """About what a step writes: its parent's size, else (a lineage's first step) the
        bit-packed masks, the accumulated state in its format and any reconstructed weights."""
        if parent is not None:
            return sum(file.stat().st_size for file in parent.folder.rglob("*") if file.is_file())
        weights = [module.weight for module in all_prunable(self.model).values()]
        per_weight = 1 / 8
        if self.config.regime == "accumulate":
            per_weight += CODECS[self.config.state.format].bits / 8
        if self.config.method == "sparsegpt" or self.config.copal.reconstruct:
            per_weight += weights[0].element_size() if weights else 4
        return int(sum(weight.numel() for weight in weights) * per_weight)

    def calibrate(self, pending: PendingStep) -> None:
        """The step's calibration sequences, from the domains its regime chooses."""
        current = self.domains[pending.domain_index]
        chosen = self.regime.calibration_domains(current, self.seen_domains(pending))
        samples = torch.cat([self.domains.samples(d) for d in chosen])
        pending.batches = list(samples.split(self.config.calibration.batch_size))

    def prune(self, pending: PendingStep) -> None:
        """Update the statistic and apply masks, block by block, in place."""
        start = time.perf_counter()
        prune_step(self.model, pending.batches, self.method, self.regime, self.structure, self.dense,
                   pending.parent, pending.writer, self.device,
                   progress=lambda done, total: self.progress("prune blocks", done, total), stream=self.stream)
        pending.prune_seconds = time.perf_counter() - start
        if self.stream is not None:  # the model is now the step's: W0 ⊙ mask, or its reconstructed weights
            self.stream.weights = _written_weights(pending.writer, self.dense)

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
            "tokenization": self.domains.start.record(),
            "environment": environment(self.device, self.config.dtype),
            "ppl": {name: result["ppl"] for name, result in evaluation.items()},
            "eval_tokens": {name: result["tokens"] for name, result in evaluation.items()},
            "sparsity": pending.writer.overall_sparsity(), "layer_sparsity": pending.writer.layer_sparsity(),
            "prune_seconds": pending.prune_seconds, "seconds": time.perf_counter() - pending.started,
            "peak_rss_mb": pending.memory.peak_mb,
        }
        if pending.tasks is not None:
            record |= pending.tasks
        final = pending.writer.commit(record)
        try:
            self.dir.set_head(pending.step_id)
        except BaseException:
            shutil.rmtree(final, ignore_errors=True)  # never a recorded step that HEAD's history skips
            raise
        if self.stream is not None:
            state = StepState(final)
            self.stream.weights = lambda name: state.weight(name, self.dense)
        self.write_metrics()
        return record

    def step(self, domain_index: int) -> dict:
        """One whole step on `self.domains[domain_index]`, continuing from HEAD."""
        pending = self.start_step(domain_index)
        try:
            self.calibrate(pending)
            self.prune(pending)
            return self.finish_step(pending, self.evaluate(pending))
        except BaseException:
            pending.writer.discard()
            raise

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

    def replay(self, step_id: int) -> ReplayResult:
        """Recompute a recorded step from its parent and data, under its recorded thread
        count and tokenization; compare its masks with the record, layer by layer, its
        other files (state, weights) byte for byte, and where masks differ its own-domain PPL."""
        import tempfile

        from copal.digests import tree_digests

        state = self.dir.step(step_id)
        state.verify()
        names = [d.name for d in self.domains]
        index = names.index(state.record["domain"])
        if self.domains[index].fingerprint != state.record["fingerprint"]:
            raise InputError(f"{self.domains[index].source.spec}: data changed since step {step_id} "
                             f"(fingerprint {self.domains[index].fingerprint}, recorded {state.record['fingerprint']})")
        recorded_files = state.record.get("files") or tree_digests(state.folder)
        self._use_start(TextStart.from_record(state.record.get("tokenization")))
        recorded_env = state.record.get("environment")
        threads = recorded_env["threads"] if recorded_env else None
        recorded = {name: state.mask(name) for name in state.mask_names()}
        current = self.stream.weights if self.stream is not None else None
        with tempfile.TemporaryDirectory() as scratch, torch_threads(threads):
            result = ReplayResult(step_id, threads, differences(recorded_env, environment(self.device,
                                                                                        self.config.dtype)),
                                  {}, domain=state.record["domain"])
            pending = self.start_step(index, parent_id=state.record["parent"], steps_dir=Path(scratch))
            self.calibrate(pending)
            self.prune(pending)
            for name in dict.fromkeys([*pending.writer.packed_masks, *recorded]):
                packed = pending.writer.packed_masks.get(name)
                if packed is None or name not in recorded:
                    result.agreement[name] = 0.0
                    continue
                mask = maskio.unpack(packed, recorded[name].shape)
                result.agreement[name] = float((mask == recorded[name]).double().mean())
            replayed = pending.writer.commit({"step": pending.step_id, "parent": state.record["parent"],
                                              "domain": state.record["domain"], "ppl": {}})
            files = StepState(replayed).record["files"]
            result.files = [name for name in sorted(set(files) | set(recorded_files)) if name != "masks.safetensors"
                            and files.get(name) != recorded_files.get(name)]
            if result.differing and state.record["domain"] in state.record.get("ppl", {}):
                ppl, _ = metrics.perplexity(self.model, self.domains.windows(self.domains[index]), self.device,
                                            self.config.evaluation.batch_size, self.stream)
                result.ppl = (state.record["ppl"][state.record["domain"]], ppl)
            if self.stream is not None:
                self.stream.weights = current
        return result

    def _use_start(self, start: TextStart) -> None:
        """Cut the run's windows with `start` (a step's recorded tokenization) from now on."""
        if start == self.domains.start:
            return
        domains = RunDomains(self.config, self.tokenizer, self.domains.fingerprints(), self.domains.data_dir, start)
        for domain in self.domains:
            domains.add(domain.source.spec)
        self.domains = domains

    def write_metrics(self) -> dict:
        payload = summarize(self.dir, self.config)
        write_json(self.dir.metrics_path, payload)
        return payload


def check_free_space(folder: Path, expected: int) -> None:
    """An EnvironmentFault if the file system of `folder` has less than `expected` bytes free."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    free = shutil.disk_usage(existing).free
    if free < expected:
        raise EnvironmentFault(f"{folder}: {_size(free)} free, a step needs about {_size(expected)}")


def _size(count: int) -> str:
    return f"{count / 1e6:.1f} MB" if count >= 100_000 else f"{count / 1e3:.1f} kB"


def _written_weights(writer: StepWriter, dense: DenseWeights):
    """The weights a step being written ends with (what StepState.weight reads back
    once it is committed): its reconstructed weights where it wrote some, else W0 ⊙ mask."""
    from safetensors import safe_open

    def weight(name: str) -> torch.Tensor:
        stored = writer.weights.index.get(name)
        if stored is not None:
            with safe_open(str(writer.weights.folder / stored), "pt") as handle:
                return handle.get_tensor(name)
        base = dense.get(name)
        return base * maskio.unpack(writer.packed_masks[name], tuple(writer.shapes[name])).to(base.dtype)

    return weight
