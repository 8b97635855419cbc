"""SHA-256 digests of a step's files: recorded in step.json when the step is written,
checked by every reader before it trusts a byte of them."""

import hashlib
from pathlib import Path

from copal.errors import InputError

RECORD = "step.json"  # holds the digests, so it is the one file not digested


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digests(folder: Path) -> dict[str, str]:
    """Relative path → SHA-256 of every file under `folder` but the record."""
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != RECORD)
    return {file.relative_to(folder).as_posix(): file_digest(file) for file in files}


def check_digests(folder: Path, recorded: dict[str, str]) -> None:
    """Every file `recorded` names has its digest, and no other file is there; else an
    InputError naming the first file that differs."""
    if not isinstance(recorded, dict):
        raise InputError(f"{folder / RECORD}: corrupt file digests")
    present = {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()} - {RECORD}
    for name in sorted(recorded):
        path = folder / name
        if name not in present:
            raise InputError(f"{path}: missing (step.json records its digest)")
        if file_digest(path) != recorded[name]:
            raise InputError(f"{path}: does not match the SHA-256 step.json records (changed or corrupt)")
    for name in sorted(present - set(recorded)):
        raise InputError(f"{folder / name}: not a file of this step (step.json records no digest for it)")
