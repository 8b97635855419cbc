"""The manuals domain: groff man pages, man1 ... man8 (the manpages package).

The man macros are here; a page written in mdoc gets mdoc.py's macros too.
"""

from collections.abc import Iterator
from pathlib import Path

from copal.corpora import mdoc, roff
from copal.corpora.files import decode, missing, read_gzip
from copal.corpora.roff import Page

# Module attributes so tests can point them elsewhere.
MAN_DIR = Path("/usr/share/man")
# The manuals domain is the pages of the Debian package `manpages` (dpkg's list
# of its files), not everything under MAN_DIR: what else lies there depends on
# the machine image (one here carries 16k Google Cloud SDK pages).
MAN_PACKAGE_LIST = Path("/var/lib/dpkg/info/manpages.list")


# Handlers of man macros and of the few requests that print or break: (page, name, args).
def _heading(page: Page, name: str, args: list[str]) -> None:
    if args:
        page.heading(" ".join(args))
    else:  # the heading is the next line
        page.blank()
        page.break_after_next = True


def _title(page: Page, name: str, args: list[str]) -> None:
    page.line(" ".join(args))


def _words(page: Page, name: str, args: list[str]) -> None:
    page.words(" ".join(args))


def _alternating(page: Page, name: str, args: list[str]) -> None:
    """.BR and friends: alternate fonts, so the words run together."""
    page.words("".join(args))


def _paragraph(page: Page, name: str, args: list[str]) -> None:
    page.blank()


def _break(page: Page, name: str, args: list[str]) -> None:
    page.flush()


def _tagged(page: Page, name: str, args: list[str]) -> None:
    page.flush()
    page.break_after_next = True


def _indented(page: Page, name: str, args: list[str]) -> None:
    """.IP [tag [indent]]"""
    page.flush()
    if args:
        page.line(args[0])


def _synopsis(page: Page, name: str, args: list[str]) -> None:
    page.flush()
    page.text(" ".join(args))


def _option(page: Page, name: str, args: list[str]) -> None:
    page.text(f"[{' '.join(args)}]")


def _fill(page: Page, name: str, args: list[str]) -> None:
    page.flush()
    page.fill = name in ("fi", "EE", "Ve")


def _table(page: Page, name: str, args: list[str]) -> None:
    page.flush()
    if name == "TS":
        page.table = {"format": True, "tab": "\t"}
    elif name == "TE":
        page.table = None
    elif page.table is not None:  # .T& starts new format lines
        page.table["format"] = True


def _silent(page: Page, name: str, args: list[str]) -> None:
    pass


MACROS = {
    "SH": _heading, "SS": _heading, "TH": _title,
    **dict.fromkeys(("B", "I", "SM", "SB", "UR", "UE", "MT", "ME"), _words),
    **dict.fromkeys(("BR", "BI", "IB", "IR", "RB", "RI"), _alternating),
    **dict.fromkeys(("PP", "LP", "P", "sp", "Sp"), _paragraph),
    **dict.fromkeys(("br", "in", "ti", "ce", "bp", "HP", "RS", "RE", "YS", "INDENT", "UNINDENT"), _break),
    "TP": _tagged, "TQ": _tagged, "IP": _indented, "SY": _synopsis, "OP": _option,
    **dict.fromkeys(("nf", "fi", "EX", "EE", "Vb", "Ve"), _fill),  # Vb/Ve: pod2man's verbatim
    **dict.fromkeys(("TS", "TE", "T&"), _table),
    # Indexing and spacing macros print nothing even with arguments.
    **dict.fromkeys(("PD", "DT", "IX", "UC", "AT", "LINKSTYLE"), _silent),
}

# An mdoc page is read with mdoc's macros on top of man's.
_MAN_AND_MDOC = {**MACROS, **mdoc.MACROS}


def man_to_text(groff: str, source: str) -> str:
    """Readable text of a man page's groff source (man or mdoc macros)."""
    # An mdoc page starts with its date, .Dd (after comments, perhaps).
    is_mdoc = groff.startswith(".Dd") or "\n.Dd" in groff
    return roff.to_text(groff, source, _MAN_AND_MDOC if is_mdoc else MACROS)


def sources() -> list[Path]:
    if not MAN_PACKAGE_LIST.is_file():
        raise missing("manuals", MAN_PACKAGE_LIST, "manpages")
    pages = []
    for line in MAN_PACKAGE_LIST.read_text().splitlines():
        listed = Path(line)
        if listed.suffix == ".gz" and listed.parent.parent == Path("/usr/share/man") \
                and listed.parent.name.startswith("man"):
            page = MAN_DIR / listed.parent.name / listed.name
            if page.is_file() and not page.is_symlink():
                pages.append(page)
    if not pages:
        raise missing("manuals", MAN_DIR / "man*" / "*.gz", "manpages")
    return sorted(pages)


def documents(paths: list[Path]) -> Iterator[tuple[str, str]]:
    for path in paths:
        text = man_to_text(decode(read_gzip(path), path), str(path))
        # Empty text: a redirect page holding just ".so man7/other.7".
        if text:
            yield f"manuals/{path.parent.name}/{path.name.removesuffix('.gz')}", text
