"""The groff language of man pages, whatever the macro package.

Not a typesetter: requests and conditionals are not evaluated, and filled text
is joined into one line per paragraph rather than wrapped. Macros become the
words they print (the macro packages, man.py and mdoc.py, say which),
formatting requests vanish, tables keep their rows and escapes become the
characters they print.
"""

import re
from collections.abc import Callable

from copal.errors import InputError

# Backslash-newline continues a line: an odd run of backslashes ("\\" is a backslash).
_CONTINUATION = re.compile(r"(\\+)\n")
# A control line: "." or "'", optional blanks, the request or macro name, the rest.
_CONTROL = re.compile(r"[.'][ \t]*([^\s\\]*)(.*)")
# What a request or macro name looks like; other "control lines" are misquoted text.
_NAME = re.compile(r"[A-Za-z%][A-Za-z0-9_%&]*")
# Everything before the first comment escape \" or \# (escaped backslashes skipped).
_BEFORE_COMMENT = re.compile(r'(?:[^\\]|\\[^"#])*')
# Macro arguments: "quoted, with "" for a quote" or unquoted runs (escapes kept whole).
_ARG = re.compile(r'"((?:[^"]|"")*)"?|((?:[^\s\\]|\\.)+)')
_TABLE_TAB = re.compile(r"tab\s*\((.)\)")

# Escapes are replaced in passes over the page's output. An escaped backslash
# "\\" is first set aside (as NUL, which a page cannot contain) so that it is
# not read as the start of an escape; then a plain substitution drops the
# escapes that print nothing, and a callback replaces the rest.
_SILENT_ESCAPE = re.compile(r"""\\(?:
    c\n?                                  # continue the line with the next
  | [fFgkmMnVY$] (?: \(.. | \[[^\]\n]*\] | . )                  # font, register, colour ...
  | n[-+] (?: \(.. | \[[^\]\n]*\] | . )                         # auto-incremented register
  | s (?: [-+]?\d | [-+]?\(\d\d | [-+]?\[[^\]\n]*\] | [-+]?'[^'\n]*' )  # type size
  | [ABbCDhHlLNoRSvwXxZ] '[^'\n]*'        # an argument between quotes: motions, widths ...
  | [&%|^,/:{}adurpz!?]                   # zero-width: &, hyphenation point, motions ...
)""", re.X)
_ESCAPE = re.compile(r"""\\(?:
    \((?P<glyph>..)                       # \(xx special character
  | \[(?P<named>[^\]\n]*)\]               # \[name] special character
  | \*(?: \((?P<string2>..) | \[(?P<stringn>[^\]\n]*)\] | (?P<string1>.) )  # string
  | (?P<char>.)                           # any other one-character escape
)""", re.X)
_CHARS = {"e": "\\", "E": "\\", " ": " ", "~": " ", "0": " ", "t": "\t", "_": "_",
          ".": ".", "'": "'", "`": "`"}
_GREEK = {f"*{latin}": greek for latin, greek in zip("abgdezyhiklmncoprstufxqwABGDEZYHIKLMNCOPRSTUFXQW",
                                                      "αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔΕΖΗΘΙΚΛΜΝΞΟΠΡΣΤΥΦΧΨΩ")}
_GLYPHS = {
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
_STRINGS = {
    "R": "®", "Tm": "™", "lq": "“", "rq": "”", "Lq": "“", "Rq": "”", "Aq": "'", "C`": '"', "C'": '"',
    'L"': "“", 'R"': "”", "--": "—", "PI": "π", "Ba": "|", "Gt": ">", "Lt": "<", "Le": "≤", "Ge": "≥",
    "Ne": "≠", "Am": "&", "Pm": "±", "If": "∞", "Na": "NaN", "Ux": "UNIX", "Pi": "π",
}


def _escapes(text: str, strings: dict[str, str]) -> str:
    """Replace groff escapes by what they print; unknown ones print nothing."""

    def replace(match: re.Match) -> str:
        kind = match.lastgroup
        value = match.group(kind)
        if kind == "char":
            return _CHARS.get(value, "")
        if kind == "glyph":
            return _GLYPHS.get(value, "")
        if kind == "named":
            if value.startswith("u") and len(value) >= 5:  # \[u00E9]; \[u0065_0301] composes
                try:
                    return "".join(chr(int(code, 16)) for code in value[1:].split("_"))
                except ValueError:
                    return ""
            return _GLYPHS.get(value, "")
        return strings.get(value, "")

    text = _SILENT_ESCAPE.sub("", text.replace("\\\\", "\x00"))
    return _ESCAPE.sub(replace, text.replace("\\-", "-")).replace("\x00", "\\")


def _args(rest: str) -> list[str]:
    return [m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2)
            for m in _ARG.finditer(rest)]


class Page:
    """A page being read: its output lines and the reader's state.

    In fill mode consecutive text joins into one paragraph line, as the
    formatter would fill it; breaks end the paragraph.
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.paragraph: list[str] = []
        self.fill = True
        self.break_after_next = False  # .TP: the next text is a tag on its own line
        self.section = ""  # the current heading
        self.table: dict | None = None  # tbl state between .TS and .TE
        self.strings = dict(_STRINGS)  # plus the page's own .ds definitions
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
                match = _TABLE_TAB.search(stripped)
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


# A macro's handler, called with the page, the macro's name and its arguments.
Macro = Callable[[Page, str, list[str]], None]


def to_text(groff: str, source: str, macros: dict[str, Macro]) -> str:
    """Readable text of groff source. `macros` handles the macro package's
    macros and the few requests that print or break; other requests vanish."""
    if "\x00" in groff:
        raise InputError(f"{source}: contains NUL bytes; not a groff man page")
    page = Page()
    block_end: str | None = None  # terminator of a skipped .de/.ig block
    conditional_depth = 0  # open \{ of a skipped .if/.ie/.el body

    if "\\\n" in groff:
        groff = _CONTINUATION.sub(_join_continued, groff)
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
                line = _BEFORE_COMMENT.match(line).group()
            if page.table is None:
                page.text(line)
            else:
                page.table_row(line)
            continue

        name, rest = _CONTROL.match(line).groups()
        if not name:  # ".", or a comment line .\" or '\"
            continue
        if '\\"' in rest or "\\#" in rest:
            rest = _BEFORE_COMMENT.match(rest).group()
        if name in ("de", "de1", "dei", "am", "am1", "ami"):  # a macro definition, up to ".." or .END
            words = rest.split()
            block_end = words[1] if len(words) > 1 else "."
        elif name == "ig":  # ignored input, likewise
            block_end = (rest.split() or ["."])[0]
        elif name in ("if", "ie", "el", "while"):  # conditionals are skipped, with their \{ ... \} bodies
            conditional_depth = max(rest.count("\\{") - rest.count("\\}"), 0)
        elif name in ("ds", "ds1"):
            key, _, value = rest.strip().partition(" ")
            page.strings[key] = _escapes(value.lstrip().removeprefix('"'), page.strings)
        elif name in macros:
            macros[name](page, name, _args(rest) if rest and not rest.isspace() else [])
        elif not _NAME.fullmatch(name):
            page.text(line)  # text that merely starts with "." or "'", like "'quoted'"
        elif not name[0].islower() and rest and not rest.isspace():
            page.words(" ".join(arg for arg in _args(rest) if arg))  # a page's own macro
        # Anything else is a groff request (all lower case) that only formats.

    page.flush()
    return _escapes("\n".join(page.lines), page.strings).strip()


def _join_continued(match: re.Match) -> str:
    backslashes = match.group(1)
    return backslashes[:-1] if len(backslashes) % 2 else match.group()
