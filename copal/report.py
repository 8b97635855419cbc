"""A run's history as one self-contained HTML page (`copal report`).

Everything comes from what the run recorded (config.yaml, dense.json and the
step records of HEAD's lineage), so a report can be rebuilt at any time without
the model or the data. Plots are PNGs embedded as base64 and the page has no
scripts or links to fetch: it opens offline and can be attached to a ticket.
"""

import base64
import html
import os
from dataclasses import dataclass
from pathlib import Path

from copal import metrics, plots
from copal.atomic import write_atomic
from copal.config import RunConfig
from copal.rundir import RunDir, summarize
from copal.errors import InputError
from copal.records import StepRecord


@dataclass
class History:
    root: Path
    config: RunConfig
    head: int
    domains: list[str]
    dense: list[float | None]
    matrix: list[list[float | None]]  # one row per step of HEAD's lineage, one column per domain
    records: list[StepRecord]  # the step.json records of HEAD's lineage, first step first
    off_lineage: list[int]  # recorded steps that HEAD's lineage does not contain (after a rollback)

    @property
    def step_columns(self) -> list[int]:
        """The matrix column of each step's own domain (a domain may come back later)."""
        return [self.domains.index(record.domain) for record in self.records]

    def bwt_by_step(self) -> list[float | None]:
        """BWT after step t, from the first t rows (undefined after the first step)."""
        return [metrics.bwt(self.matrix[:t], self.step_columns[:t]) for t in range(1, len(self.matrix) + 1)]

    def average_by_step(self) -> list[float | None]:
        return [metrics.average_ppl(self.matrix[:t], self.step_columns[:t]) for t in range(1, len(self.matrix) + 1)]

    def step_labels(self) -> list[str]:
        return [f"{record.step}: {record.domain}" for record in self.records]


def load_history(root: Path) -> History:
    run_dir = RunDir(root).require()
    config, _ = run_dir.read_config()
    lineage = run_dir.lineage()
    if not lineage:
        raise InputError(f"{root}: the run has no recorded steps yet; nothing to report")
    summary = summarize(run_dir, config)
    ids = {state.id for state in lineage}
    return History(root=Path(root), config=config, head=run_dir.head(), domains=summary.domains,
                   dense=summary.dense_ppl, matrix=summary.ppl, records=[s.record for s in lineage],
                   off_lineage=[i for i in run_dir.step_ids() if i not in ids])


def _short_layer_names(names: list[str]) -> list[str]:
    """Drop the prefix all layer names share (e.g. `model.layers.`), up to a dot."""
    if len(names) < 2:
        return names
    prefix = os.path.commonprefix(names)
    cut = prefix.rfind(".") + 1
    return [name[cut:] for name in names]


def figures(history: History) -> dict[str, bytes]:
    """The report's plots, by caption."""
    labels = history.step_labels()
    layers = list(history.records[-1].layer_sparsity)
    layer_rows = [[record.layer_sparsity.get(name) for name in layers] for record in history.records]
    config = history.config
    title = f"{config.method}/{config.regime}, {config.structure}, sparsity {config.sparsity:g}"
    result = {
        "Perplexity after each step (row 0: the dense model)": plots.ppl_heatmap(
            [history.dense, *history.matrix], ["dense", *labels], history.domains, title),
        "Backward transfer after each step (computed on the steps so far)": plots.bwt_over_steps(
            labels, history.bwt_by_step()),
    }
    if layers:
        result["Realised sparsity per layer"] = plots.layer_heatmap(
            layer_rows, labels, _short_layer_names(layers), "realised sparsity per pruned layer")
    return result


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1400px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dt { font-weight: 600; } dd { margin: 0; }
figure { margin: 1em 0; } figcaption { font-style: italic; margin-bottom: 0.4em; }
img { max-width: 100%; border: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; } td.text { text-align: left; font-family: monospace; }
"""


def _cell(value, text: bool = False) -> str:
    if isinstance(value, float):
        value = plots.format_value(value)
    elif value is None:
        value = "–"
    return f'<td{" class=text" if text else ""}>{html.escape(str(value))}</td>'


def _step_table(history: History) -> str:
    head = ["step", "domain", "data fingerprint", "method", "regime", "structure", "sparsity",
            *[f"PPL {name}" for name in history.domains], "BWT", "avg PPL", "seconds", "peak RSS MB"]
    rows = []
    for record, bwt, average in zip(history.records, history.bwt_by_step(), history.average_by_step()):
        cells = [_cell(record.step), _cell(record.domain, True), _cell(record.fingerprint, True),
                 _cell(record.method, True), _cell(record.regime, True),
                 _cell(record.structure, True), _cell(f"{record.sparsity:.4f}")]
        cells += [_cell(record.ppl.get(name)) for name in history.domains]
        cells += [_cell(bwt), _cell(average), _cell(f"{record.seconds:.1f}"),
                  _cell(f"{record.peak_rss_mb:.0f}")]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    header = "".join(f"<th>{html.escape(name)}</th>" for name in head)
    return f'<table id="steps"><thead><tr>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def render(history: History) -> str:
    """The report as one HTML document."""
    config = history.config
    calibration, evaluation = config.calibration, config.evaluation
    bwt, average = history.bwt_by_step()[-1], history.average_by_step()[-1]
    revisions = sorted({record.code_revision or "unknown" for record in history.records})
    facts = {
        "run directory": str(history.root),
        "model": config.model,
        "method / regime": f"{config.method} / {config.regime}",
        "structure": f"{config.structure}, target sparsity {config.sparsity:g}",
        "calibration": f"{calibration.nsamples} × {calibration.seqlen} tokens per domain, seed {calibration.seed}",
        "evaluation": f"windows of {evaluation.seqlen} tokens, at most {evaluation.max_tokens} tokens per domain",
        "HEAD": f"step {history.head}; lineage {' → '.join(str(r.step) for r in history.records)}",
        "code revision": ", ".join(revisions),
        "BWT after the last step": plots.format_value(bwt),
        "average PPL after the last step": plots.format_value(average),
    }
    if history.off_lineage:
        facts["steps not on HEAD's lineage"] = ", ".join(map(str, history.off_lineage))
    facts_html = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in facts.items())
    figures_html = "".join(
        f'<figure><figcaption>{html.escape(caption)}</figcaption>'
        f'<img alt="{html.escape(caption)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'
        f"</figure>" for caption, data in figures(history).items())
    title = html.escape(f"copal run report: {config.name}")
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
            f"<style>{_STYLE}</style></head><body><h1>{title}</h1><dl>{facts_html}</dl>"
            f"<h2>Plots</h2>{figures_html}<h2>Steps</h2>{_step_table(history)}</body></html>\n")


def write_report(root: Path, out: Path | None = None) -> Path:
    """Render the report of the run in `root` to `out` (default RUN_DIR/report.html)."""
    history = load_history(root)
    return write_atomic(Path(out) if out else Path(root) / "report.html", render(history))
