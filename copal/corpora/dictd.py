"""The lexicon domain: WordNet as a dictd database (dict-wn)."""

from collections.abc import Iterator
from pathlib import Path

from copal.corpora.files import decode, missing, read_gzip
from copal.errors import InputError

# Module attributes so tests can point them elsewhere.
DICT_PATH = Path("/usr/share/dictd/wn.dict.dz")
DICT_INDEX_PATH = Path("/usr/share/dictd/wn.index")

# dictd's base-64 digits; a field is a big-endian number in this alphabet.
_DIGITS = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _number(field: str, where: str) -> int:
    if not field:
        raise InputError(f"{where}: empty offset or length field")
    number = 0
    for char in field:
        digit = _DIGITS.get(char)
        if digit is None:
            raise InputError(f"{where}: bad character {char!r} in base64 number {field!r}")
        number = number * 64 + digit
    return number


def parse_dict_index(index_text: str, source: str) -> list[tuple[str, int, int]]:
    """Entries of a dictd .index file as (headword, byte offset, byte length).

    Each line is ``headword<TAB>offset<TAB>length`` (some dictfmt versions add a
    fourth column with the original spelling, which is ignored).
    """
    entries = []
    for number, line in enumerate(index_text.splitlines(), start=1):
        if not line:
            continue
        fields = line.split("\t")
        where = f"{source}:{number}"
        if len(fields) not in (3, 4) or not fields[0]:
            raise InputError(f"{where}: expected 'headword<TAB>offset<TAB>length', got {line[:60]!r}")
        entries.append((fields[0], _number(fields[1], where), _number(fields[2], where)))
    if not entries:
        raise InputError(f"{source}: no entries in the dictd index")
    return entries


def cut_dict_entries(data: bytes, index: list[tuple[str, int, int]], source: str) -> Iterator[tuple[str, str]]:
    """(headword, entry text) for each index entry, cut out of the decompressed
    dictionary `data`. Offsets are checked before the first entry is returned."""
    for headword, offset, length in index:
        if offset + length > len(data):
            raise InputError(f"{source}: entry {headword!r} at bytes {offset}..{offset + length} "
                             f"lies beyond the end of the data ({len(data)} bytes)")
    return ((headword, decode(data[offset:offset + length], f"{source}: entry {headword!r}").strip())
            for headword, offset, length in index)


def sources() -> list[Path]:
    for path in (DICT_PATH, DICT_INDEX_PATH):
        if not path.is_file():
            raise missing("lexicon", path, "dict-wn")
    return [DICT_PATH, DICT_INDEX_PATH]


def documents(paths: list[Path]) -> Iterator[tuple[str, str]]:
    dict_path, index_path = paths
    index = parse_dict_index(decode(index_path.read_bytes(), index_path), str(index_path))
    # The .dict.dz is dictzip: gzip with a random-access table in a header field.
    data = read_gzip(dict_path)
    seen: dict[str, int] = {}
    for headword, text in cut_dict_entries(data, index, str(dict_path)):
        # dictfmt's metadata entries ("00-database-info"; older versions "00databaseinfo").
        if headword.startswith(("00-database-", "00database")) or not text:
            continue
        seen[headword] = seen.get(headword, 0) + 1
        suffix = f"#{seen[headword]}" if seen[headword] > 1 else ""
        yield f"lexicon/{headword}{suffix}", text
