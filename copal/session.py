"""A run as one process holds it: its configuration and directory, the model
(resident or streamed, copal.execution), the method, regime and structure, and
the domains. The step functions (copal.lifecycle) and the evaluator
(copal.evaluator) work on a session; nothing here computes a step."""

from pathlib import Path
import torch

from copal.config import RunConfig
from copal.data import Domain
from copal.domains import RunDomains
from copal.execution import Resident, Streamed, open_execution
from copal.masks import Structure
from copal.methods import Method, build_method
from copal.model import resolve_device
from copal.progress import Progress
from copal.regimes import REGIMES, Regime
from copal.rundir import RunDir, reconcile
from copal.state import StepState
from copal.tokens import TextStart

def _quiet(what: str, done: int, total: int) -> None:
    pass


class RunSession:
    """The run directory `root` opened with `config` (reconciled with what it recorded)."""

    def __init__(self, config: RunConfig, root: Path, progress: Progress | None = None,
                 data_dir: Path | None = None, readonly: bool = False, streaming: bool | None = None):
        """`streaming` (None: wherever possible): keep only the non-block tensors in
        memory and read each block from the checkpoint when the pass or the
        evaluation reaches it (copal.streaming). Not possible for a method with a
        whole-model statistic, with `evaluation.tasks` (lm-eval runs the whole
        model), or a checkpoint whose block tensors are not found under the
        model's names (a hub id, renamed keys); those keep the model resident."""
        self.dir = RunDir(root)
        self.progress = progress or _quiet
        self.readonly = readonly
        self.device: torch.device = resolve_device(config.device)
        config, fingerprints = reconcile(self.dir, config)
        self.config = config
        self.method: Method = build_method(config)
        self.regime: Regime = REGIMES[config.regime]
        self.structure = Structure(config.sparsity, config.n_m, config.mask_scope)
        stream = streaming is not False and not self.method.whole_model and not config.evaluation.tasks
        self.execution: Resident | Streamed = open_execution(config.model, config.dtype, config.trust_remote_code,
                                                             stream)
        self.domains = RunDomains(config, self.execution.tokenizer, fingerprints, data_dir)
        for spec in config.domains:
            self.domains.add(spec)
        self.save_config()

    @property
    def model(self):
        return self.execution.model

    @property
    def tokenizer(self):
        return self.execution.tokenizer

    def save_config(self) -> None:
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
        self.save_config()
        return len(self.domains) - 1

    def seen_domains(self, parent: StepState | None) -> list[Domain]:
        """The domains `parent`'s lineage (parent included) has stepped on, in run order."""
        lineage = self.dir.lineage(parent.id) if parent else []
        return self.domains.named(state.record.domain for state in lineage)

    def use_start(self, start: TextStart) -> None:
        """Cut the run's windows with `start` (a step's recorded tokenization) from now on."""
        if start == self.domains.start:
            return
        domains = RunDomains(self.config, self.tokenizer, self.domains.fingerprints(), self.domains.data_dir, start)
        for domain in self.domains:
            domains.add(domain.source.spec)
        self.domains = domains
