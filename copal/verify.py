"""`copal verify`: a whole run directory checked against what it recorded."""

from pathlib import Path

from copal.errors import InputError
from copal.rundir import RunDir


def verify_run(root: Path) -> dict:
    """Check the config, the run's records, every step's files against their digests, each
    step's parent and HEAD's lineage; the first fault is an InputError naming the file.
    Returns {"steps", "undigested", "head"}."""
    run_dir = RunDir(root).require()
    run_dir.read_config()
    run_dir.check_records()
    ids = run_dir.step_ids()
    undigested = 0
    for step_id in ids:
        state = run_dir.step(step_id)
        state.verify()
        undigested += not state.has_digests
        run_dir.lineage(step_id)
    head = run_dir.head()
    if head and head not in ids:
        raise InputError(f"{run_dir.head_path}: names step {head}, which is not recorded")
    return {"steps": len(ids), "undigested": undigested, "head": head}
