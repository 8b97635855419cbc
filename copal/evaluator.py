"""What a run measures of its model: perplexity on its domains, the lm-eval tasks
of `evaluation.tasks`, and the dense model's row of the PPL matrix (dense.json)."""

from dataclasses import dataclass

from copal.data import Domain
from copal.session import RunSession
from copal.state import read_json, write_json


@dataclass(frozen=True)
class Perplexity:
    """A model's perplexity on one domain's evaluation windows, and the tokens it predicted."""

    ppl: float
    tokens: int


class Evaluator:
    """Evaluates `session`'s model as it is now.

    `known_dense`: dense PPLs measured elsewhere under this same model and
    evaluation setting (the benchmark's cells share one), used instead of
    measuring them again."""

    def __init__(self, session: RunSession, known_dense: dict[str, float] | None = None):
        self.session = session
        self.known_dense = dict(known_dense or {})

    def evaluated_domains(self, step=None) -> list[Domain]:
        """Every domain of the run, or with `evaluation.domains: seen` only those that
        `step`'s (a copal.lifecycle.PendingStep) lineage has calibrated on, its own included."""
        session = self.session
        if session.config.evaluation.domains == "all" or step is None:
            return list(session.domains)
        chosen = session.seen_domains(step.parent) + [session.domains[step.domain_index]]
        return [domain for domain in session.domains if domain in chosen]

    def perplexities(self, domains: list[Domain], what: str = "evaluate") -> dict[str, Perplexity]:
        """Each domain's perplexity, of the model as it is now."""
        session = self.session
        results = {}
        for index, domain in enumerate(domains):
            session.progress(what, index, len(domains))
            ppl, tokens = session.execution.perplexity(session.domains.windows(domain), session.device,
                                                       session.config.evaluation.batch_size)
            results[domain.name] = Perplexity(ppl, tokens)
        session.progress(what, len(domains), len(domains))
        return results

    def evaluate(self, step=None) -> dict[str, Perplexity]:
        """PPL on the domains `evaluated_domains` names; with `evaluation.tasks` the
        lm-eval results go to `step.tasks`."""
        results = self.perplexities(self.evaluated_domains(step))
        if step is not None and self.session.config.evaluation.tasks:
            step.tasks = self.tasks()
        return results

    def tasks(self) -> dict:
        """evaluation.tasks (lm-eval) on the model as it is now: {"tasks", "task_items"}."""
        from copal.lm_eval_tasks import evaluate_tasks

        session = self.session
        ev = session.config.evaluation
        session.progress("evaluate tasks", 0, 1)
        results = evaluate_tasks(session.model, session.tokenizer, ev.tasks, ev.task_include_path, session.device,
                                 ev.batch_size, ev.task_limit)
        session.progress("evaluate tasks", 1, 1)
        return results

    def dense_ppl(self) -> dict[str, float]:
        """Row 0 of the PPL matrix, computed once per domain and kept in dense.json."""
        session = self.session
        run_dir = session.dir
        recorded = read_json(run_dir.dense_path, "dense PPLs") if run_dir.dense_path.exists() else {}
        known = {d.name: self.known_dense[d.name] for d in session.domains
                 if d.name not in recorded and d.name in self.known_dense}
        missing = [d for d in session.domains if d.name not in recorded and d.name not in known]
        recorded |= known
        tasks_missing = bool(session.config.evaluation.tasks) and not run_dir.dense_tasks_path.exists()
        if missing or tasks_missing:
            session.execution.show_dense()
        if missing:
            measured = self.perplexities(missing, "evaluate dense")
            recorded |= {name: result.ppl for name, result in measured.items()}
        if missing or known:
            write_json(run_dir.dense_path, recorded)
        if tasks_missing:
            write_json(run_dir.dense_tasks_path, self.tasks())
        return {d.name: recorded[d.name] for d in session.domains}
