"""The progress callback every long-running part accepts (continual runs, grids, flows)."""

from typing import Callable

# progress(stage, done, total): `done` of `total` units of `stage` are finished; the
# console (cli/console.py) draws it as a bar or as plain lines.
Progress = Callable[[str, int, int], None]
