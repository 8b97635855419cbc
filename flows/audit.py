"""The audit view of a run directory: every step with its provenance."""

from pathlib import Path

from copal.records import HistoryRow
from copal.rundir import RunDir, summarize
from tasks.snapshot import revisions
from tasks.tracking import Tracker


def history_rows(root: Path) -> list[HistoryRow]:
    """One row per recorded step (in id order), with BWT and average PPL along
    that step's own lineage, and its MLflow run id and DVC revision."""
    directory = RunDir(root).require()
    config, _ = directory.read_config()
    head = directory.head()
    in_lineage = {state.id for state in directory.lineage()}
    tracked = Tracker(directory).steps()
    snapshots = revisions(directory)
    rows = []
    for step_id in directory.step_ids():
        record = directory.step(step_id).record
        upto = summarize(directory, config, head=step_id)
        rows.append(HistoryRow(
            step=step_id, parent=record.parent, head=step_id == head,
            in_head_lineage=step_id in in_lineage, domain=record.domain,
            fingerprint=record.fingerprint, method=record.method, regime=record.regime,
            structure=record.structure, sparsity=record.sparsity,
            ppl_own=record.ppl.get(record.domain), ppl=record.ppl,
            avg_ppl=upto.avg_ppl, bwt=upto.bwt,
            mlflow_run_id=tracked.get(str(step_id), {}).get("run_id"),
            model_version=tracked.get(str(step_id), {}).get("model_version"),
            dvc_revision=snapshots.get(str(step_id)),
        ))
    return rows


def write_dvc_metrics(root: Path, out: Path) -> None:
    """Files for `dvc metrics` and `dvc plots`: metrics.json (final BWT, average
    PPL and PPL per domain) and history.csv (one row per step of HEAD's lineage)."""
    import csv
    import io
    import json

    from copal.atomic import write_atomic

    directory = RunDir(root).require()
    config, _ = directory.read_config()
    summary = summarize(directory, config)
    final = dict(zip(summary.domains, summary.ppl[-1])) if summary.ppl else {}
    write_atomic(out / "metrics.json", json.dumps({"bwt": summary.bwt, "avg_ppl": summary.avg_ppl,
                                                   "ppl": final}, indent=1) + "\n")
    rows = [row for row in history_rows(root) if row.in_head_lineage]
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["step", "domain", "ppl_own", "avg_ppl", "bwt"])
    for row in rows:
        writer.writerow([row.step, row.domain, row.ppl_own, row.avg_ppl, row.bwt])
    write_atomic(out / "history.csv", table.getvalue())
