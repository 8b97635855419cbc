"""The fortunes domain: fortune cookie files (the fortunes package)."""

from collections.abc import Iterator
from pathlib import Path

from copal.corpora.files import decode, missing
from copal.errors import InputError

# A module attribute so tests can point it elsewhere.
FORTUNES_DIR = Path("/usr/share/games/fortunes")


def _overstrike(line: str) -> str:
    """Resolve terminal overstriking ("____\\b\\b\\b\\bBODY" underlines BODY):
    a backspace steps back one column and a later character replaces an
    earlier one, except that an underscore never hides a letter."""
    cells: list[str] = []
    column = 0
    for char in line:
        if char == "\b":
            column = max(column - 1, 0)
            continue
        if column == len(cells):
            cells.append(char)
        elif char != "_":
            cells[column] = char
        column += 1
    return "".join(cells)


def parse_fortunes(text: str, source: str) -> list[str]:
    """The entries of a fortune file: texts separated by lines holding a single '%'."""
    if "\x00" in text:
        raise InputError(f"{source}: contains NUL bytes; not a fortune text file")
    entries = []
    lines: list[str] = []
    for line in [*text.split("\n"), "%"]:
        if line.rstrip("\r") != "%":
            lines.append(_overstrike(line) if "\b" in line else line)
            continue
        entry = "\n".join(lines).replace("\a", "").strip("\n").rstrip()
        if entry.strip():
            entries.append(entry)
        lines = []
    if not entries:
        raise InputError(f"{source}: no fortune entries (text separated by '%' lines)")
    return entries


def sources() -> list[Path]:
    if not FORTUNES_DIR.is_dir():
        raise missing("fortunes", FORTUNES_DIR, "fortunes")
    # Plain files only: *.dat are strfile's binary indexes, *.u8 symlinks to the texts.
    files = sorted(p for p in FORTUNES_DIR.iterdir()
                   if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))
    if not files:
        raise missing("fortunes", FORTUNES_DIR / "*", "fortunes")
    return files


def documents(paths: list[Path]) -> Iterator[tuple[str, str]]:
    for path in paths:
        for index, entry in enumerate(parse_fortunes(decode(path.read_bytes(), path), str(path))):
            yield f"fortunes/{path.name}/{index}", entry
