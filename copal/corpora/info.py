"""The docs domain: a GNU info manual (Python 3.11's, from python3.11-doc)."""

import re
from collections.abc import Iterator
from pathlib import Path

from copal.corpora.files import decode, missing, read_gzip
from copal.errors import InputError

# A module attribute so tests can point it elsewhere.
INFO_PATH = Path("/usr/share/info/python3.11.info.gz")

# A node's header line: "File: python3.11.info,  Node: Some Node,  Next: ...".
_HEADER = re.compile(r"File: [^,\n]*,\s*Node: ([^,\n]+)")
# Units between \x1f separators that are bookkeeping, not nodes.
_BOOKKEEPING = ("Tag Table:", "Indirect:", "End Tag Table", "Local Variables:")
# Images and the index marker are wrapped in NUL-backspace brackets: \0\b[image src="..."\0\b].
_MARKER = re.compile(r"\x00\x08\[.*?\x00\x08\]", re.S)
# Cross references: "*note Label: target." / "*note Label: target," / "*note Node::".
# The label may wrap onto the next line; the target is an anchor or node name.
_XREF = re.compile(r"\*[Nn]ote(\s+)([^:]{1,300}?)(?:::|:\s+[^.,:]{1,300}?([.,]))")


def _xref_label(match: re.Match) -> str:
    space, label, end = match.groups()
    # Keep a line break that followed "*note"; a plain space was already before it.
    lead = space[1:] if space.startswith(" ") else space
    # makeinfo ends a reference with "." when the sentence did not supply a "," or
    # ".": keep the "." only where it looks like a sentence end, followed by a
    # line break or by the two spaces makeinfo puts between sentences (more
    # spaces align a table column).
    after = match.string[match.end():match.end() + 3]
    sentence_end = not after or after[0] == "\n" or (after[:2] == "  " and after[2:3].strip())
    return lead + label + (end if end == "," or sentence_end else "")


def parse_info(text: str, source: str) -> list[tuple[str, str]]:
    """Nodes of a GNU info file as (node name, body) pairs, in file order.

    The header line is dropped, image/index markers removed and cross
    references reduced to their labels; empty nodes are skipped.
    """
    units = text.split("\x1f")
    if len(units) < 2:
        raise InputError(f"{source}: no \\x1f node separators; not a GNU info file")
    nodes = []
    # units[0] is the preamble ("This is X.info, produced by makeinfo ...").
    for number, unit in enumerate(units[1:], start=1):
        unit = unit.lstrip("\n")
        if not unit.strip() or unit.startswith(_BOOKKEEPING):
            continue
        header, _, body = unit.partition("\n")
        match = _HEADER.match(header)
        if match is None:
            raise InputError(f"{source}: unit {number} has no 'File: ..., Node: ...' header line: {header[:60]!r}")
        body = _XREF.sub(_xref_label, _MARKER.sub("", body)).strip()
        if body:
            nodes.append((match.group(1).strip(), body))
    if not nodes:
        raise InputError(f"{source}: no nodes with a 'Node:' header; not a GNU info file")
    return nodes


def sources() -> list[Path]:
    """The info file, or its parts python3.11.info-1.gz, -2.gz ... when it is split."""
    if not INFO_PATH.is_file():
        raise missing("docs", INFO_PATH, "python3.11-doc")
    stem = INFO_PATH.name.removesuffix(".gz")
    parts = [p for p in INFO_PATH.parent.glob(f"{stem}-*.gz") if p.name[len(stem) + 1:-3].isdigit()]
    parts.sort(key=lambda p: int(p.name[len(stem) + 1:-3]))
    return [INFO_PATH, *parts]


def documents(paths: list[Path]) -> Iterator[tuple[str, str]]:
    # A split manual's main file holds only the indirect and tag tables: read the parts.
    files = paths[1:] or paths
    for path in files:
        for node, body in parse_info(decode(read_gzip(path), path), str(path)):
            yield f"docs/{node}", body
