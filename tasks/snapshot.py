"""DVC snapshots of a step's directory (masks, sensitivity, weights).

Outside `dvc repro`, a step directory is added to DVC's cache with `dvc add`,
which leaves `steps/K.dvc` (to commit with git) and returns its content hash:
the step's DVC revision. Inside `dvc repro` (DVC sets DVC_STAGE) the stage
itself versions its outputs, and a nested `dvc add` would deadlock on DVC's
repository lock, so the stage name is returned instead.

DVC waits at most 3 s for its repository lock: a `dvc add` started while another one
hashes a large step directory fails ("Unable to acquire lock"). Runs of one project that
snapshot at the same time (`copal run --sweep` on a cluster) therefore take turns, on a
file lock of their own (`exclusive_dvc_add`).

Outside a DVC project nothing is snapshotted; the run says so once (`dvc init` in a
folder above the run directory turns snapshots on for the next steps).
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import yaml

from copal.atomic import exclusive_lock
from copal.rundir import RunDir
from copal.state import read_json, write_json

log = logging.getLogger("copal")
_SAID_OFF: set[Path] = set()  # the run directories told that their snapshots are off


def revisions(run_dir: RunDir) -> dict[str, str | None]:
    """Step id → DVC revision, as recorded in RUN_DIR/snapshots.json."""
    path = run_dir.root / "snapshots.json"
    return read_json(path, "snapshot record") if path.exists() else {}


def record_revision(run_dir: RunDir, step_id: int, revision: str | None) -> None:
    write_json(run_dir.root / "snapshots.json", revisions(run_dir) | {str(step_id): revision})


def dvc_root(path: Path) -> Path | None:
    for folder in [path.resolve(), *path.resolve().parents]:
        if (folder / ".dvc").is_dir():
            return folder
    return None


def exclusive_dvc_add(root: Path):
    """Exclusive, across processes, for the DVC project at `root`."""
    return exclusive_lock(root / ".dvc" / "tmp" / "copal-add.lock")


def snapshot_step(step_dir: Path) -> str | None:
    """The step's DVC revision: an md5 from `dvc add`, `stage:NAME`, or None outside a DVC project."""
    if os.environ.get("DVC_STAGE"):
        return f"stage:{os.environ['DVC_STAGE']}"
    root = dvc_root(step_dir)
    pointer = step_dir.with_name(step_dir.name + ".dvc")
    if root is None:
        _say_off(step_dir, "is not inside a DVC project. To snapshot each step, run `git init && dvc init` "
                           "(or `dvc init --no-scm`) in a folder above it")
        return None
    if _git_ignored(pointer, root):  # DVC refuses a pointer file git would not track
        _say_off(step_dir, "is ignored by git (.gitignore), so DVC cannot version it. To snapshot each step, "
                           "write the run outside the ignored folder")
        return None
    with exclusive_dvc_add(root):
        result = subprocess.run([sys.executable, "-m", "dvc", "add", str(step_dir.resolve())],
                                cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()
        raise RuntimeError(f"dvc add {step_dir} failed: {lines[0]}")
    return yaml.safe_load(pointer.read_text())["outs"][0]["md5"]


def _say_off(step_dir: Path, why: str) -> None:
    """Once per run directory: why its steps are not snapshotted."""
    run = step_dir.resolve().parent.parent
    if run not in _SAID_OFF:
        _SAID_OFF.add(run)
        log.info("DVC snapshots are off: %s %s", run, why)


def _git_ignored(path: Path, root: Path) -> bool:
    """Whether git ignores `path` in the repository the DVC project at `root` is in (False without git)."""
    if not (root / ".git").exists() and not any((parent / ".git").exists() for parent in root.parents):
        return False
    result = subprocess.run(["git", "check-ignore", "-q", str(path.resolve())], cwd=root, capture_output=True)
    return result.returncode == 0
