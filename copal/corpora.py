"""Builtin text domains, read from real files that Debian packages install.

Five domains, each parsed from its native format into documents
``(doc_id, text)``:

========  =====================================  ==========================
name      source                                 Debian package
========  =====================================  ==========================
docs      GNU info manual of Python 3.11         python3.11-doc
lexicon   WordNet as a dictd database            dict-wn
code      stdlib sources of the running Python   (the interpreter itself)
fortunes  fortune cookie files                   fortunes
manuals   groff man pages, man1 ... man8         manpages (and others)
========  =====================================  ==========================

Every format has a public parser that takes already-read content, so malformed
input can be tested without the real files; each raises :class:`InputError`
with one line naming the input and what is wrong with it.
"""

import gzip
import hashlib
import os
import re
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

from copal.errors import InputError

BUILTIN_NAMES: tuple[str, ...] = ("docs", "lexicon", "code", "fortunes", "manuals")

# Where the raw files live; module attributes so tests can point them elsewhere.
INFO_PATH = Path("/usr/share/info/python3.11.info.gz")
DICT_PATH = Path("/usr/share/dictd/wn.dict.dz")
DICT_INDEX_PATH = Path("/usr/share/dictd/wn.index")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
MAN_DIR = Path("/usr/share/man")
# The manuals domain is the pages of the Debian package `manpages` (dpkg's list
# of its files), not everything under MAN_DIR: what else lies there depends on
# the machine image (one here carries 16k Google Cloud SDK pages).
MAN_PACKAGE_LIST = Path("/var/lib/dpkg/info/manpages.list")

# Bumped whenever parsing changes, so cached parses keyed by the signature expire.
_PARSER_VERSION = "2"


# ---------------------------------------------------------------- public API


def iter_builtin(name: str) -> Iterator[tuple[str, str]]:
    """Documents of builtin domain `name` in a deterministic order.

    An unknown name or missing files raise InputError at once, before the first
    document is read; errors in the files themselves surface while iterating.
    """
    sources = _sources(name)
    return _LOADERS[name](sources)


def builtin_signature(name: str) -> str:
    """A cheap fingerprint of the raw source files (paths, sizes, mtimes) so
    callers can cache the parsed result."""
    digest = hashlib.sha256(f"{name}\0{_PARSER_VERSION}\0".encode())
    for path in _sources(name):
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def _sources(name: str) -> list[Path]:
    """The raw files domain `name` is read from, in reading order."""
    if name not in _LOADERS:
        raise InputError(f"builtin:{name}: unknown builtin domain; choose one of {', '.join(BUILTIN_NAMES)}")
    return _SOURCES[name]()


def _missing(name: str, path: Path, package: str) -> InputError:
    return InputError(f"builtin:{name}: {path} not found; install the Debian package {package} "
                      f"(apt-get install {package})")


def _read_gzip(path: Path) -> bytes:
    try:
        return gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{path}: not a valid gzip file ({error})") from None


def _decode(data: bytes, source: object) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{source}: not UTF-8 text (bad byte at offset {error.start})") from None


# ---------------------------------------------------------------- docs: GNU info

# A node's header line: "File: python3.11.info,  Node: Some Node,  Next: ...".
_INFO_HEADER = re.compile(r"File: [^,\n]*,\s*Node: ([^,\n]+)")
# Units between \x1f separators that are bookkeeping, not nodes.
_INFO_BOOKKEEPING = ("Tag Table:", "Indirect:", "End Tag Table", "Local Variables:")
# Images and the index marker are wrapped in NUL-backspace brackets: \0\b[image src="..."\0\b].
_INFO_MARKER = re.compile(r"\x00\x08\[.*?\x00\x08\]", re.S)
# Cross references: "*note Label: target." / "*note Label: target," / "*note Node::".
# The label may wrap onto the next line; the target is an anchor or node name.
_INFO_XREF = re.compile(r"\*[Nn]ote(\s+)([^:]{1,300}?)(?:::|:\s+[^.,:]{1,300}?([.,]))")


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
        if not unit.strip() or unit.startswith(_INFO_BOOKKEEPING):
            continue
        header, _, body = unit.partition("\n")
        match = _INFO_HEADER.match(header)
        if match is None:
            raise InputError(f"{source}: unit {number} has no 'File: ..., Node: ...' header line: {header[:60]!r}")
        body = _INFO_XREF.sub(_xref_label, _INFO_MARKER.sub("", body)).strip()
        if body:
            nodes.append((match.group(1).strip(), body))
    if not nodes:
        raise InputError(f"{source}: no nodes with a 'Node:' header; not a GNU info file")
    return nodes


def _info_sources() -> list[Path]:
    """The info file, or its parts python3.11.info-1.gz, -2.gz ... when it is split."""
    if not INFO_PATH.is_file():
        raise _missing("docs", INFO_PATH, "python3.11-doc")
    stem = INFO_PATH.name.removesuffix(".gz")
    parts = [p for p in INFO_PATH.parent.glob(f"{stem}-*.gz") if p.name[len(stem) + 1:-3].isdigit()]
    parts.sort(key=lambda p: int(p.name[len(stem) + 1:-3]))
    return [INFO_PATH, *parts]


def _iter_docs(sources: list[Path]) -> Iterator[tuple[str, str]]:
    # A split manual's main file holds only the indirect and tag tables: read the parts.
    files = sources[1:] or sources
    for path in files:
        for node, body in parse_info(_decode(_read_gzip(path), path), str(path)):
            yield f"docs/{node}", body


# ---------------------------------------------------------------- lexicon: dictd

# dictd's base-64 digits; a field is a big-endian number in this alphabet.
_DICTD_DIGITS = {c: i for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _dictd_number(field: str, where: str) -> int:
    if not field:
        raise InputError(f"{where}: empty offset or length field")
    number = 0
    for char in field:
        digit = _DICTD_DIGITS.get(char)
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
        entries.append((fields[0], _dictd_number(fields[1], where), _dictd_number(fields[2], where)))
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
    return ((headword, _decode(data[offset:offset + length], f"{source}: entry {headword!r}").strip())
            for headword, offset, length in index)


def _dict_sources() -> list[Path]:
    for path in (DICT_PATH, DICT_INDEX_PATH):
        if not path.is_file():
            raise _missing("lexicon", path, "dict-wn")
    return [DICT_PATH, DICT_INDEX_PATH]


def _iter_lexicon(sources: list[Path]) -> Iterator[tuple[str, str]]:
    dict_path, index_path = sources
    index = parse_dict_index(_decode(index_path.read_bytes(), index_path), str(index_path))
    # The .dict.dz is dictzip: gzip with a random-access table in a header field.
    data = _read_gzip(dict_path)
    seen: dict[str, int] = {}
    for headword, text in cut_dict_entries(data, index, str(dict_path)):
        # dictfmt's metadata entries ("00-database-info"; older versions "00databaseinfo").
        if headword.startswith(("00-database-", "00database")) or not text:
            continue
        seen[headword] = seen.get(headword, 0) + 1
        suffix = f"#{seen[headword]}" if seen[headword] > 1 else ""
        yield f"lexicon/{headword}{suffix}", text


# ---------------------------------------------------------------- code: stdlib

# Directories below the stdlib that are not the library itself.
_CODE_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _code_sources() -> list[Path]:
    root = _stdlib()
    if not root.is_dir():
        raise InputError(f"builtin:code: {root} not found; the running Python has no standard library sources")
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _CODE_SKIP_DIRS]
        files.extend(Path(folder, n) for n in names if n.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _iter_code(sources: list[Path]) -> Iterator[tuple[str, str]]:
    root = _stdlib()
    for path in sources:
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        if text.strip():
            yield f"code/{path.relative_to(root).as_posix()}", text


# ---------------------------------------------------------------- fortunes


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


def _fortune_sources() -> list[Path]:
    if not FORTUNES_DIR.is_dir():
        raise _missing("fortunes", FORTUNES_DIR, "fortunes")
    # Plain files only: *.dat are strfile's binary indexes, *.u8 symlinks to the texts.
    files = sorted(p for p in FORTUNES_DIR.iterdir()
                   if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))
    if not files:
        raise _missing("fortunes", FORTUNES_DIR / "*", "fortunes")
    return files


def _iter_fortunes(sources: list[Path]) -> Iterator[tuple[str, str]]:
    for path in sources:
        for index, entry in enumerate(parse_fortunes(_decode(path.read_bytes(), path), str(path))):
            yield f"fortunes/{path.name}/{index}", entry


# ---------------------------------------------------------------- manuals: groff man and mdoc
#
# Not a typesetter: requests and conditionals are not evaluated, and filled text
# is joined into one line per paragraph rather than wrapped. Macros become the
# words they print, formatting requests vanish, tables keep their rows and
# escapes become the characters they print.

# Backslash-newline continues a line: an odd run of backslashes ("\\" is a backslash).
_MAN_CONTINUATION = re.compile(r"(\\+)\n")
# A control line: "." or "'", optional blanks, the request or macro name, the rest.
_MAN_CONTROL = re.compile(r"[.'][ \t]*([^\s\\]*)(.*)")
# What a request or macro name looks like; other "control lines" are misquoted text.
_MAN_NAME = re.compile(r"[A-Za-z%][A-Za-z0-9_%&]*")
# Everything before the first comment escape \" or \# (escaped backslashes skipped).
_MAN_BEFORE_COMMENT = re.compile(r'(?:[^\\]|\\[^"#])*')
# Macro arguments: "quoted, with "" for a quote" or unquoted runs (escapes kept whole).
_MAN_ARG = re.compile(r'"((?:[^"]|"")*)"?|((?:[^\s\\]|\\.)+)')
_MAN_TABLE_TAB = re.compile(r"tab\s*\((.)\)")

# Escapes are replaced in passes over the page's output. An escaped backslash
# "\\" is first set aside (as NUL, which a page cannot contain) so that it is
# not read as the start of an escape; then a plain substitution drops the
# escapes that print nothing, and a callback replaces the rest.
_MAN_SILENT_ESCAPE = re.compile(r"""\\(?:
    c\n?                                  # continue the line with the next
  | [fFgkmMnVY$] (?: \(.. | \[[^\]\n]*\] | . )                  # font, register, colour ...
  | n[-+] (?: \(.. | \[[^\]\n]*\] | . )                         # auto-incremented register
  | s (?: [-+]?\d | [-+]?\(\d\d | [-+]?\[[^\]\n]*\] | [-+]?'[^'\n]*' )  # type size
  | [ABbCDhHlLNoRSvwXxZ] '[^'\n]*'        # an argument between quotes: motions, widths ...
  | [&%|^,/:{}adurpz!?]                   # zero-width: &, hyphenation point, motions ...
)""", re.X)
_MAN_ESCAPE = re.compile(r"""\\(?:
    \((?P<glyph>..)                       # \(xx special character
  | \[(?P<named>[^\]\n]*)\]               # \[name] special character
  | \*(?: \((?P<string2>..) | \[(?P<stringn>[^\]\n]*)\] | (?P<string1>.) )  # string
  | (?P<char>.)                           # any other one-character escape
)""", re.X)
_MAN_CHARS = {"e": "\\", "E": "\\", " ": " ", "~": " ", "0": " ", "t": "\t", "_": "_",
              ".": ".", "'": "'", "`": "`"}
_GREEK = {f"*{latin}": greek for latin, greek in zip("abgdezyhiklmncoprstufxqwABGDEZYHIKLMNCOPRSTUFXQW",
                                                      "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ")}
_MAN_GLYPHS = {
    **_GREEK,
    "em": "—", "en": "–", "hy": "-", "mi": "−", "pl": "+", "eq": "=", "bu": "•", "ci": "○", "sq": "□",
    "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›",
    "ga": "`", "aa": "´", "ha": "^", "ti": "~", "rs": "\\", "sl": "/", "ba": "|", "bv": "|", "or": "|",
    "br": "│", "ul": "_", "ru": "_", "at": "@", "sh": "#", "Do": "$", "ct": "¢", "Po": "£", "Eu": "€",
    "co": "©", "rg": "®", "tm": "™", "de": "°", "ps": "¶", "sc": "§", "dg": "†", "dd": "‡", "pd": "∂",
    "+-": "±", "mu": "×", "di": "÷", "**": "∗", "->": "→", "<-": "←", "<>": "↔", "ua": "↑", "da": "↓",
    "rA": "⇒", "lA": "⇐", "<=": "≤", ">=": "≥", "!=": "≠", "==": "≡", "~=": "≅", "~~": "≈", "if": "∞",
    "la": "⟨", "ra": "⟩", "ts": '"', "12": "½", "14": "¼", "34": "¾", "ss": "ß", "'e": "é", "`e": "è",
}
# Strings defined by the man and mdoc packages and by pod2man's preamble (whose
# own definitions sit in conditional blocks, which are skipped).
_MAN_STRINGS = {
    "R": "®", "Tm": "™", "lq": "“", "rq": "”", "Lq": "“", "Rq": "”", "Aq": "'", "C`": '"', "C'": '"',
    'L"': "“", 'R"': "”", "--": "—", "PI": "π", "Ba": "|", "Gt": ">", "Lt": "<", "Le": "≤", "Ge": "≥",
    "Ne": "≠", "Am": "&", "Pm": "±", "If": "∞", "Na": "NaN", "Ux": "UNIX", "Pi": "π",
}


def _man_escapes(text: str, strings: dict[str, str]) -> str:
    """Replace groff escapes by what they print; unknown ones print nothing."""

    def replace(match: re.Match) -> str:
        kind = match.lastgroup
        value = match.group(kind)
        if kind == "char":
            return _MAN_CHARS.get(value, "")
        if kind == "glyph":
            return _MAN_GLYPHS.get(value, "")
        if kind == "named":
            if value.startswith("u") and len(value) >= 5:  # \[u00E9]; \[u0065_0301] composes
                try:
                    return "".join(chr(int(code, 16)) for code in value[1:].split("_"))
                except ValueError:
                    return ""
            return _MAN_GLYPHS.get(value, "")
        return strings.get(value, "")

    text = _MAN_SILENT_ESCAPE.sub("", text.replace("\\\\", "\x00"))
    return _MAN_ESCAPE.sub(replace, text.replace("\\-", "-")).replace("\x00", "\\")


def _man_args(rest: str) -> list[str]:
    return [m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2)
            for m in _MAN_ARG.finditer(rest)]


class _ManPage:
    """A page being read: its output lines and the reader's state.

    In fill mode consecutive text joins into one paragraph line, as the
    formatter would fill it; breaks end the paragraph.
    """

    def __init__(self, mdoc: bool) -> None:
        self.mdoc = mdoc
        self.lines: list[str] = []
        self.paragraph: list[str] = []
        self.fill = True
        self.break_after_next = False  # .TP: the next text is a tag on its own line
        self.section = ""  # the current heading
        self.table: dict | None = None  # tbl state between .TS and .TE
        self.strings = dict(_MAN_STRINGS)  # plus the page's own .ds definitions
        self.name = ""  # mdoc: the first .Nm, repeated by a bare .Nm

    def text(self, line: str) -> None:
        if not self.fill:
            self.line(line)
        elif not line or line.isspace():
            self.blank()
        else:
            if line[0] in " \t":  # leading blanks break the line, as in groff
                self.flush()
            self.paragraph.append(line.rstrip())
            if self.break_after_next:
                self.flush()

    def words(self, words: str) -> None:
        """Text printed by a macro: nothing when it has no words."""
        if words:
            self.text(words)

    def flush(self) -> None:
        if self.paragraph:
            # "\c" at the end of a piece continues it without a space.
            self.lines.append(" ".join(self.paragraph).replace("\\c ", ""))
            self.paragraph = []
        self.break_after_next = False

    def line(self, line: str) -> None:
        self.flush()
        self.lines.append(line.rstrip())

    def blank(self) -> None:
        """An empty line, unless the last line is empty already."""
        self.flush()
        if self.lines and self.lines[-1]:
            self.lines.append("")

    def heading(self, title: str) -> None:
        self.blank()
        self.line(title)
        self.section = title

    def table_row(self, line: str) -> None:
        """A tbl line: options and format lines are skipped, data rows kept
        with their cells two spaces apart."""
        table = self.table
        if table["format"]:
            # The options line ends in ";" (and may name the cell separator);
            # the format lines end with the one that ends in ".".
            stripped = line.strip()
            if stripped.endswith(";"):
                match = _MAN_TABLE_TAB.search(stripped)
                if match:
                    table["tab"] = match.group(1)
            elif stripped.endswith("."):
                table["format"] = False
            return
        # "_" and "=" are horizontal rules; T{ ... T} holds a multi-line cell.
        cells = [cell.strip() for cell in line.split(table["tab"])]
        row = "  ".join(cell for cell in cells if cell not in ("_", "=")).replace("T{", "").replace("T}", "").strip()
        if row:
            self.line(row)


# Handlers of man macros and of the few requests that print or break: (page, name, args).
def _man_heading(page: _ManPage, name: str, args: list[str]) -> None:
    if args:
        page.heading(" ".join(args))
    else:  # the heading is the next line
        page.blank()
        page.break_after_next = True


def _man_title(page: _ManPage, name: str, args: list[str]) -> None:
    page.line(" ".join(args))


def _man_words(page: _ManPage, name: str, args: list[str]) -> None:
    page.words(" ".join(args))


def _man_alternating(page: _ManPage, name: str, args: list[str]) -> None:
    """.BR and friends: alternate fonts, so the words run together."""
    page.words("".join(args))


def _man_paragraph(page: _ManPage, name: str, args: list[str]) -> None:
    page.blank()


def _man_break(page: _ManPage, name: str, args: list[str]) -> None:
    page.flush()


def _man_tagged(page: _ManPage, name: str, args: list[str]) -> None:
    page.flush()
    page.break_after_next = True


def _man_indented(page: _ManPage, name: str, args: list[str]) -> None:
    """.IP [tag [indent]]"""
    page.flush()
    if args:
        page.line(args[0])


def _man_synopsis(page: _ManPage, name: str, args: list[str]) -> None:
    page.flush()
    page.text(" ".join(args))


def _man_option(page: _ManPage, name: str, args: list[str]) -> None:
    page.text(f"[{' '.join(args)}]")


def _man_fill(page: _ManPage, name: str, args: list[str]) -> None:
    page.flush()
    page.fill = name in ("fi", "EE", "Ve")


def _man_table(page: _ManPage, name: str, args: list[str]) -> None:
    page.flush()
    if name == "TS":
        page.table = {"format": True, "tab": "\t"}
    elif name == "TE":
        page.table = None
    elif page.table is not None:  # .T& starts new format lines
        page.table["format"] = True


def _man_silent(page: _ManPage, name: str, args: list[str]) -> None:
    pass


_MAN_HANDLERS = {
    "SH": _man_heading, "SS": _man_heading, "TH": _man_title,
    **dict.fromkeys(("B", "I", "SM", "SB", "UR", "UE", "MT", "ME"), _man_words),
    **dict.fromkeys(("BR", "BI", "IB", "IR", "RB", "RI"), _man_alternating),
    **dict.fromkeys(("PP", "LP", "P", "sp", "Sp"), _man_paragraph),
    **dict.fromkeys(("br", "in", "ti", "ce", "bp", "HP", "RS", "RE", "YS", "INDENT", "UNINDENT"), _man_break),
    "TP": _man_tagged, "TQ": _man_tagged, "IP": _man_indented, "SY": _man_synopsis, "OP": _man_option,
    **dict.fromkeys(("nf", "fi", "EX", "EE", "Vb", "Ve"), _man_fill),  # Vb/Ve: pod2man's verbatim
    **dict.fromkeys(("TS", "TE", "T&"), _man_table),
    # Indexing and spacing macros print nothing even with arguments.
    **dict.fromkeys(("PD", "DT", "IX", "UC", "AT", "LINKSTYLE"), _man_silent),
}

# mdoc (BSD) macros. Structural ones print nothing but may break; enclosures
# bracket the rest of the line; other callable macros print their arguments.
_MDOC_STRUCTURE = {"Dd", "Os", "Bk", "Ek", "Rs", "Re", "Sm", "Bf", "Ef", "Tg", "Rv", "Ex"}
_MDOC_ENCLOSE = {"Op": ("[", "]"), "Bq": ("[", "]"), "Pq": ("(", ")"), "Brq": ("{", "}"), "Aq": ("⟨", "⟩"),
                 "Dq": ("“", "”"), "Qq": ('"', '"'), "Sq": ("‘", "’"), "Ql": ("‘", "’")}
_MDOC_OPEN_CLOSE = {"Oo": "[", "Oc": "]", "Po": "(", "Pc": ")", "Bo": "[", "Bc": "]", "Bro": "{", "Brc": "}",
                    "Do": "“", "Dc": "”", "Qo": '"', "Qc": '"', "So": "‘", "Sc": "’", "Ao": "⟨", "Ac": "⟩"}
_MDOC_CALLABLE = {"Ad", "An", "Ap", "Ar", "At", "Bsx", "Bx", "Cd", "Cm", "Dv", "Dx", "Em", "Er", "Es", "Ev",
                  "Fa", "Fd", "Fn", "Fo", "Fc", "Fr", "Ft", "Fx", "Hf", "Ic", "In", "Li", "Lk", "Me", "Mt",
                  "Nm", "No", "Nx", "Ox", "Pa", "Pf", "Sx", "Sy", "Tn", "Ux", "Va", "Vt", "Xr", "Ns", "Fl",
                  "Lb", "St", "Ms", "Ot", "Xc", "Xo", "Eo", "Ec", "%A", "%B", "%D", "%J", "%N", "%O", "%P",
                  "%Q", "%R", "%T", "%U", "%V", *_MDOC_ENCLOSE, *_MDOC_OPEN_CLOSE}
_MDOC_PUNCTUATION = {".", ",", ";", ":", "?", "!", ")", "]"}


def _mdoc_inline(page: _ManPage, tokens: list[str]) -> str:
    """An mdoc macro line's words: macro names vanish, 'Fl x' prints '-x',
    'Xr ls 1' prints 'ls(1)', enclosures bracket the rest of the line."""
    words: list[str] = []
    closers: list[str] = []
    glue = False  # attach the next word to the previous one

    def emit(word: str) -> None:
        nonlocal glue
        if glue and words:
            words[-1] += word
        else:
            words.append(word)
        glue = False

    xref = 0  # plain words left of an "Xr name section"; the section is parenthesised
    for position, token in enumerate(tokens):
        following = tokens[position + 1] if position + 1 < len(tokens) else None
        if token in _MDOC_ENCLOSE:
            opener, closer = _MDOC_ENCLOSE[token]
            emit(opener)
            glue = True
            closers.append(closer)
        elif token in _MDOC_OPEN_CLOSE:  # Oo ... Oc and friends: explicit open and close
            glue = glue or token.endswith("c")
            emit(_MDOC_OPEN_CLOSE[token])
            glue = token.endswith("o")
        elif token == "Fl":
            emit("-")
            glue = True
        elif token in ("Ns", "Pf"):
            glue = True
        elif token == "Xr":
            xref = 2
        elif token == "Nm" and (following is None or following in _MDOC_CALLABLE
                                or following in _MDOC_PUNCTUATION):
            emit(page.name)  # a bare .Nm repeats the page's name
        elif token not in _MDOC_CALLABLE:
            if xref == 1:
                glue = True
                token = f"({token})"
            elif token in _MDOC_PUNCTUATION:
                glue = True
            xref = max(xref - 1, 0)
            emit(token)
    for closer in reversed(closers):
        glue = True
        emit(closer)
    return " ".join(words)


def _mdoc_macro(page: _ManPage, name: str, args: list[str]) -> None:
    if name == "Nm":
        page.name = page.name or (args[0] if args else "")
        if page.section == "SYNOPSIS":
            page.flush()  # each synopsis line starts with the command's name
    if name in ("Sh", "Ss"):
        page.heading(_mdoc_inline(page, args))
    elif name in ("Pp", "Lp"):
        page.blank()
    elif name == "Dt":
        page.line(" ".join(args))
    elif name == "Nd":
        page.text("- " + _mdoc_inline(page, args))
    elif name in ("Bd", "Ed"):  # a display, literal or filled
        page.flush()
        page.fill = name == "Ed" or not {"-literal", "-unfilled"} & set(args)
    elif name in ("Bl", "El"):
        page.flush()
    elif name in ("It", "D1", "Dl"):  # a list item's tag, or a one-line display
        page.flush()
        page.words(_mdoc_inline(page, args))
        page.flush()
    elif name not in _MDOC_STRUCTURE:
        page.words(_mdoc_inline(page, [name, *args]))


_MDOC_HANDLERS = dict.fromkeys(
    (*_MDOC_STRUCTURE, *_MDOC_CALLABLE, "Sh", "Ss", "Pp", "Lp", "Dt", "Nd", "Bd", "Ed", "Bl", "El", "It",
     "D1", "Dl"), _mdoc_macro)


def man_to_text(groff: str, source: str) -> str:
    """Readable text of a man page's groff source (man or mdoc macros)."""
    if "\x00" in groff:
        raise InputError(f"{source}: contains NUL bytes; not a groff man page")
    page = _ManPage(mdoc=groff.startswith(".Dd") or "\n.Dd" in groff)
    handlers = {**_MAN_HANDLERS, **_MDOC_HANDLERS} if page.mdoc else _MAN_HANDLERS
    block_end: str | None = None  # terminator of a skipped .de/.ig block
    conditional_depth = 0  # open \{ of a skipped .if/.ie/.el body

    if "\\\n" in groff:
        groff = _MAN_CONTINUATION.sub(_join_continued, groff)
    for line in groff.split("\n"):
        if block_end is not None:
            if line[:1] in ".'" and line[1:].split()[:1] == [block_end]:
                block_end = None
            continue
        if conditional_depth:
            conditional_depth += line.count("\\{") - line.count("\\}")
            continue
        if line[:1] not in (".", "'"):
            if '\\"' in line or "\\#" in line:
                line = _MAN_BEFORE_COMMENT.match(line).group()
            if page.table is None:
                page.text(line)
            else:
                page.table_row(line)
            continue

        name, rest = _MAN_CONTROL.match(line).groups()
        if not name:  # ".", or a comment line .\" or '\"
            continue
        if '\\"' in rest or "\\#" in rest:
            rest = _MAN_BEFORE_COMMENT.match(rest).group()
        if name in ("de", "de1", "dei", "am", "am1", "ami"):  # a macro definition, up to ".." or .END
            words = rest.split()
            block_end = words[1] if len(words) > 1 else "."
        elif name == "ig":  # ignored input, likewise
            block_end = (rest.split() or ["."])[0]
        elif name in ("if", "ie", "el", "while"):  # conditionals are skipped, with their \{ ... \} bodies
            conditional_depth = max(rest.count("\\{") - rest.count("\\}"), 0)
        elif name in ("ds", "ds1"):
            key, _, value = rest.strip().partition(" ")
            page.strings[key] = _man_escapes(value.lstrip().removeprefix('"'), page.strings)
        elif name in handlers:
            handlers[name](page, name, _man_args(rest) if rest and not rest.isspace() else [])
        elif not _MAN_NAME.fullmatch(name):
            page.text(line)  # text that merely starts with "." or "'", like "'quoted'"
        elif not name[0].islower() and rest and not rest.isspace():
            page.words(" ".join(arg for arg in _man_args(rest) if arg))  # a page's own macro
        # Anything else is a groff request (all lower case) that only formats.

    page.flush()
    return _man_escapes("\n".join(page.lines), page.strings).strip()


def _join_continued(match: re.Match) -> str:
    backslashes = match.group(1)
    return backslashes[:-1] if len(backslashes) % 2 else match.group()


def _man_sources() -> list[Path]:
    if not MAN_PACKAGE_LIST.is_file():
        raise _missing("manuals", MAN_PACKAGE_LIST, "manpages")
    pages = []
    for line in MAN_PACKAGE_LIST.read_text().splitlines():
        listed = Path(line)
        if listed.suffix == ".gz" and listed.parent.parent == Path("/usr/share/man") \
                and listed.parent.name.startswith("man"):
            page = MAN_DIR / listed.parent.name / listed.name
            if page.is_file() and not page.is_symlink():
                pages.append(page)
    if not pages:
        raise _missing("manuals", MAN_DIR / "man*" / "*.gz", "manpages")
    return sorted(pages)


def _iter_manuals(sources: list[Path]) -> Iterator[tuple[str, str]]:
    for path in sources:
        text = man_to_text(_decode(_read_gzip(path), path), str(path))
        # Empty text: a redirect page holding just ".so man7/other.7".
        if text:
            yield f"manuals/{path.parent.name}/{path.name.removesuffix('.gz')}", text


# ---------------------------------------------------------------- registry

_SOURCES = {"docs": _info_sources, "lexicon": _dict_sources, "code": _code_sources,
            "fortunes": _fortune_sources, "manuals": _man_sources}
_LOADERS = {"docs": _iter_docs, "lexicon": _iter_lexicon, "code": _iter_code,
            "fortunes": _iter_fortunes, "manuals": _iter_manuals}
