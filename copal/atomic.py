"""Files shared between processes: write one whole or not at all (a temporary name in
the same folder, then a rename), and hold an exclusive lock on one."""

import fcntl
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, data: str | bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        if isinstance(data, str):
            partial.write_text(data, encoding="utf-8")
        else:
            partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def check_target(path: Path, what: str) -> None:
    """`path` can become a directory copal writes: it is no symbolic link and no file,
    and the nearest folder that exists above it is a writable directory (InputError else)."""
    from copal.errors import InputError

    path = Path(path)
    if path.is_symlink():
        raise InputError(f"{path}: {what} is a symbolic link; give a real directory")
    if path.exists() and not path.is_dir():
        raise InputError(f"{path}: {what} exists and is not a directory")
    existing = next(folder for folder in (path, *path.parents) if folder.exists() or folder.is_symlink())
    if not existing.is_dir():
        raise InputError(f"{path}: {what} lies under {existing}, which is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{path}: {what} is not writable ({existing} refuses writes)")


def _holder() -> str:
    return f"PID {os.getpid()} on {socket.gethostname()}"


@contextmanager
def exclusive_lock(path: Path, busy: Callable[[str], None] | None = None,
                   stale: Callable[[str], None] | None = None):
    """An exclusive flock on `path` (created, with its folder, if missing) across processes.

    The holder writes who it is ("PID N on HOST") into the file and empties it on
    release. The kernel drops a flock when its process dies, so a lock found free but
    not empty was left by a process that died holding it: `stale(holder)` is told.
    Without `busy` a held lock is waited for; with it, `busy(holder)` is called
    instead (and must raise)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            busy(lock.read().strip() or "another process")
            raise
        left = lock.read().strip()
        if left and stale:
            stale(left)
        lock.seek(0)
        lock.truncate()
        lock.write(_holder() + "\n")
        lock.flush()
        try:
            yield
        finally:
            lock.seek(0)
            lock.truncate()
            lock.flush()
            fcntl.flock(lock, fcntl.LOCK_UN)


def lock_holder(path: Path) -> str | None:
    """Who holds the lock on `path` now ("PID N on HOST"); None if nobody (or no file)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    with open(descriptor) as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return lock.read().strip() or "another process"
        fcntl.flock(lock, fcntl.LOCK_UN)
        return None
