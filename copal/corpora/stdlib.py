"""The code domain: the standard library sources of the running Python."""

import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from copal.errors import InputError

# Directories below the stdlib that are not the library itself.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def sources() -> list[Path]:
    root = _stdlib()
    if not root.is_dir():
        raise InputError(f"builtin:code: {root} not found; the running Python has no standard library sources")
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        files.extend(Path(folder, n) for n in names if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def documents(paths: list[Path]) -> Iterator[tuple[str, str]]:
    root = _stdlib()
    for path in paths:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            yield f"code/{path.relative_to(root).as_posix()}", text
