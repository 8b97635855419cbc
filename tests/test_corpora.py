"""The builtin domains, read from the real files Debian packages install
(python3.11-doc, dict-wn, fortunes, manpages), and each format's parser on
malformed input."""

import functools
import gzip
import itertools
import re
from dataclasses import dataclass, field

import pytest

from copal.corpora import BUILTIN_NAMES, builtin_signature, dictd, fortune, info, iter_builtin, man
from copal.corpora.dictd import cut_dict_entries, parse_dict_index
from copal.corpora.fortune import parse_fortunes
from copal.corpora.info import parse_info
from copal.corpora.man import man_to_text
from copal.errors import InputError

# Measured on this machine: docs 5306, lexicon 147306, code 731, fortunes 15217,
# manuals 207 (the non-redirect pages of the `manpages` package).
MIN_DOCUMENTS = {"docs": 5000, "lexicon": 140_000, "code": 600, "fortunes": 10_000, "manuals": 200}

# Documents whose text the content checks read.
WANTED = {
    "docs/itertools — Functions creating iterators for efficient looping",
    "lexicon/dog",
    "code/os.py",
    "manuals/man7/signal.7",
}

# groff escapes that should never survive into the text, as opposed to
# backslashes that a page prints on purpose (shell line continuations, "\n").
LEFTOVER_ESCAPE = re.compile(r"\\(?:f[BIRP(\[1-9]|[(*\[&-]|s[-+\d])")


@dataclass
class Summary:
    ids: list[str] = field(default_factory=list)
    chars: int = 0
    empty: int = 0
    texts: dict[str, str] = field(default_factory=dict)
    lines: int = 0
    backslash_lines: int = 0
    escape_lines: int = 0
    percent_lines: int = 0


@functools.cache
def summary(name: str) -> Summary:
    """One full pass over a domain, keeping ids and a few statistics, not the texts."""
    result = Summary()
    for doc_id, text in iter_builtin(name):
        result.ids.append(doc_id)
        result.chars += len(text)
        result.empty += not text.strip()
        if doc_id in WANTED:
            result.texts[doc_id] = text
        lines = text.split("\n")
        result.lines += len(lines)
        result.percent_lines += lines.count("%")
        if "\\" in text:
            result.backslash_lines += sum("\\" in line for line in lines)
            result.escape_lines += sum(bool(LEFTOVER_ESCAPE.search(line)) for line in lines)
    return result


# ---------------------------------------------------------------- real files


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_domain_has_many_unique_nonempty_documents(name):
    result = summary(name)
    assert len(result.ids) >= MIN_DOCUMENTS[name]
    assert len(set(result.ids)) == len(result.ids)
    assert all(doc_id.startswith(f"{name}/") for doc_id in result.ids)
    assert result.empty == 0
    assert result.chars > 1_000_000


@pytest.mark.parametrize("name", ["docs", "code", "fortunes", "lexicon"])
def test_two_passes_give_the_same_ids_in_the_same_order(name):
    assert [doc_id for doc_id, _ in iter_builtin(name)] == summary(name).ids


def test_manuals_two_passes_start_the_same():
    prefix = [doc_id for doc_id, _ in itertools.islice(iter_builtin("manuals"), 300)]
    assert prefix == summary("manuals").ids[:300]


def test_docs_content():
    result = summary("docs")
    assert "docs/Top" in result.ids
    text = result.texts["docs/itertools — Functions creating iterators for efficient looping"]
    assert "“iterator algebra”" in text and "File: python3.11.info" not in text
    # Cross references are reduced to their labels: "combining map() and count()",
    # also in tables, where makeinfo's closing "." must go.
    assert "*note" not in text and "map() and count()" in text
    assert re.search(r"^count\(\) +start, \[step\]", text, re.M)


def test_lexicon_content():
    result = summary("lexicon")
    text = result.texts["lexicon/dog"]
    assert text.startswith("dog\n") and "Canis familiaris" in text and "domestic dog" in text
    assert not any(doc_id.startswith("lexicon/00-database") for doc_id in result.ids)


def test_code_content():
    result = summary("code")
    assert "def makedirs(" in result.texts["code/os.py"]
    assert "code/json/decoder.py" in result.ids
    assert result.ids == sorted(result.ids)
    for doc_id in result.ids:
        parts = doc_id.split("/")
        assert not {"test", "tests", "idle_test", "site-packages", "__pycache__"} & set(parts), doc_id


def test_fortunes_content():
    result = summary("fortunes")
    assert result.percent_lines == 0
    assert all(re.fullmatch(r"fortunes/[\w.-]+/\d+", doc_id) for doc_id in result.ids)
    assert not any(doc_id.split("/")[1].endswith((".dat", ".u8")) for doc_id in result.ids)
    assert "fortunes/fortunes/0" in result.ids


def test_manuals_content():
    result = summary("manuals")
    text = result.texts["manuals/man7/signal.7"]
    assert "SIGKILL" in text and "\\f" not in text and "\\-" not in text
    assert text.startswith("signal 7")
    assert "\nDESCRIPTION\n" in text
    # man3/queue.3 is a redirect (".so man7/queue.7"): skipped, its target is kept.
    assert "manuals/man3/queue.3" not in result.ids and "manuals/man7/queue.7" in result.ids


def test_manuals_have_no_leftover_escapes():
    result = summary("manuals")
    # groff escapes are all translated; the few left are pages documenting them.
    assert result.escape_lines / result.lines < 0.001
    # Backslashes a page prints on purpose (shell continuations, "\n", regexes)
    # remain: 1.6% of lines here.
    assert result.backslash_lines / result.lines < 0.03


def test_signature_is_stable_and_distinct():
    signatures = {name: builtin_signature(name) for name in BUILTIN_NAMES}
    assert all(re.fullmatch(r"[0-9a-f]{64}", s) for s in signatures.values())
    assert len(set(signatures.values())) == len(BUILTIN_NAMES)
    assert builtin_signature("docs") == signatures["docs"]


def test_signature_follows_the_source_files(tmp_path, monkeypatch):
    monkeypatch.setattr(fortune, "FORTUNES_DIR", tmp_path)
    (tmp_path / "jokes").write_text("one\n%\ntwo\n")
    (tmp_path / "jokes.dat").write_bytes(b"\x00\x01")
    before = builtin_signature("fortunes")
    assert list(iter_builtin("fortunes")) == [("fortunes/jokes/0", "one"), ("fortunes/jokes/1", "two")]
    (tmp_path / "jokes").write_text("one\n%\ntwo\n%\nthree\n")
    assert builtin_signature("fortunes") != before


# ---------------------------------------------------------------- missing or unknown


def test_unknown_domain():
    for call in (iter_builtin, builtin_signature):
        with pytest.raises(InputError, match=r"^builtin:poems: unknown builtin domain; choose one of docs, "
                                             r"lexicon, code, fortunes, manuals$"):
            call("poems")


@pytest.mark.parametrize("name, module, attribute, package", [
    ("docs", info, "INFO_PATH", "python3.11-doc"),
    ("lexicon", dictd, "DICT_PATH", "dict-wn"),
    ("lexicon", dictd, "DICT_INDEX_PATH", "dict-wn"),
    ("fortunes", fortune, "FORTUNES_DIR", "fortunes"),
    ("manuals", man, "MAN_PACKAGE_LIST", "manpages"),
])
def test_missing_files_name_the_package(tmp_path, monkeypatch, name, module, attribute, package):
    missing = tmp_path / "gone"
    monkeypatch.setattr(module, attribute, missing)
    expected = (f"^builtin:{name}: {re.escape(str(missing))} not found; install the Debian package "
                f"{re.escape(package)} \\(apt-get install {re.escape(package)}\\)$")
    with pytest.raises(InputError, match=expected):
        iter_builtin(name)  # raises at once, before iterating
    with pytest.raises(InputError, match=expected):
        builtin_signature(name)


# ---------------------------------------------------------------- GNU info

INFO = ("This is demo.info, produced by makeinfo.\n\n"
        "\x1f\nFile: demo.info,  Node: Top,  Next: Loops,  Up: (dir)\n\nDemo\n****\n\n"
        "See *note Loops::, and *note the for loop: 1a2. for details.  *note\nwhile: 3f, too.\n"
        "\x00\x08[image src=\"demo/loop.png\"\x00\x08]\n"
        "\x1f\nFile: demo.info,  Node: Empty,  Prev: Top,  Up: Top\n\n\n"
        "\x1f\nFile: demo.info,  Node: Loops,  Prev: Empty,  Up: Top\n\nLoops repeat. See *note Top: 0.\n\n"
        "\x1f\nTag Table:\nNode: Top\x7f40\n\x1f\nEnd Tag Table\n")


def test_parse_info():
    nodes = parse_info(INFO, "demo.info")
    assert [name for name, _ in nodes] == ["Top", "Loops"]  # the empty node is skipped
    top = nodes[0][1]
    assert top.startswith("Demo\n****")
    assert "See Loops, and the for loop for details.  \nwhile, too." in top
    assert "image" not in top and "\x00" not in top
    assert nodes[1][1] == "Loops repeat. See Top."


@pytest.mark.parametrize("text, problem", [
    ("Just some text without nodes.\n", "no \\\\x1f node separators"),
    ("preamble\x1f\nThis is not a header\nbody\n", "unit 1 has no 'File: ..., Node: ...' header"),
    ("preamble\x1f\nTag Table:\nNode: Top\x7f10\n\x1f\nEnd Tag Table\n", "no nodes"),
])
def test_parse_info_rejects_malformed(text, problem):
    with pytest.raises(InputError, match=f"^bad.info: {problem}"):
        parse_info(text, "bad.info")


def test_docs_loader_rejects_a_file_that_is_not_gzip(tmp_path, monkeypatch):
    path = tmp_path / "python3.11.info.gz"
    path.write_text(INFO)
    monkeypatch.setattr(info, "INFO_PATH", path)
    with pytest.raises(InputError, match="python3.11.info.gz: not a valid gzip file"):
        list(iter_builtin("docs"))


def test_docs_loader_reads_split_info_parts(tmp_path, monkeypatch):
    main = tmp_path / "python3.11.info.gz"
    main.write_bytes(gzip.compress(b"preamble\x1f\nIndirect:\npython3.11.info-1: 100\n\x1f\nTag Table:\n"))
    for number, node in ((2, "Second"), (1, "First")):
        page = f"part\x1f\nFile: python3.11.info,  Node: {node},  Up: Top\n\n{node} text\n"
        (tmp_path / f"python3.11.info-{number}.gz").write_bytes(gzip.compress(page.encode()))
    monkeypatch.setattr(info, "INFO_PATH", main)
    assert list(iter_builtin("docs")) == [("docs/First", "First text"), ("docs/Second", "Second text")]


# ---------------------------------------------------------------- dictd


def test_parse_dict_index_and_cut_entries():
    data = b"dog\n  n 1: a canine\ncat\n  n 1: a feline\n"
    index_text = "cat\tU\tU\ndog\tA\tU\n"  # offsets and lengths in dictd's base 64: A=0, U=20
    index = parse_dict_index(index_text, "demo.index")
    assert index == [("cat", 20, 20), ("dog", 0, 20)]
    assert parse_dict_index("x\tBA\t/\n", "demo.index") == [("x", 64, 63)]
    assert list(cut_dict_entries(data, index, "demo.dict")) == [("cat", "cat\n  n 1: a feline"),
                                                               ("dog", "dog\n  n 1: a canine")]


@pytest.mark.parametrize("index_text, problem", [
    ("dog\tA!\tV\n", "demo.index:1: bad character '!' in base64 number 'A!'"),
    ("cat\tV\tS\ndog\tA\n", "demo.index:2: expected 'headword<TAB>offset<TAB>length'"),
    ("cat\t\tS\n", "demo.index:1: empty offset or length field"),
    ("\n", "demo.index: no entries"),
])
def test_parse_dict_index_rejects_malformed(index_text, problem):
    with pytest.raises(InputError, match=f"^{re.escape(problem)}"):
        parse_dict_index(index_text, "demo.index")


def test_cut_dict_entries_rejects_offsets_beyond_the_data():
    with pytest.raises(InputError, match=r"^demo.dict: entry 'dog' at bytes 0\.\.64 lies beyond the end"):
        cut_dict_entries(b"dog\n", [("dog", 0, 64)], "demo.dict")


def test_lexicon_loader(tmp_path, monkeypatch):
    data = b"00-database-info\nmetadata\ndog\n  n 1: a canine\n"
    (tmp_path / "wn.dict.dz").write_bytes(gzip.compress(data))
    (tmp_path / "wn.index").write_text("00-database-info\tA\ta\ndog\ta\tU\ndog\ta\tU\n")
    monkeypatch.setattr(dictd, "DICT_PATH", tmp_path / "wn.dict.dz")
    monkeypatch.setattr(dictd, "DICT_INDEX_PATH", tmp_path / "wn.index")
    assert list(iter_builtin("lexicon")) == [("lexicon/dog", "dog\n  n 1: a canine"),
                                             ("lexicon/dog#2", "dog\n  n 1: a canine")]
    (tmp_path / "wn.dict.dz").write_bytes(data)  # not compressed
    with pytest.raises(InputError, match="wn.dict.dz: not a valid gzip file"):
        list(iter_builtin("lexicon"))


# ---------------------------------------------------------------- fortunes


def test_parse_fortunes():
    text = "%\nFirst.\n\t-- Someone\n%\n\n%\n  indented\nI *____\b\b\b\bknew* it.\a\n%\n"
    assert parse_fortunes(text, "demo") == ["First.\n\t-- Someone", "  indented\nI *knew* it."]


@pytest.mark.parametrize("text, problem", [
    ("\x00\x01\x02\x7fELF\x00\x00", "contains NUL bytes"),
    ("%\n%\n  \n%\n", "no fortune entries"),
])
def test_parse_fortunes_rejects_malformed(text, problem):
    with pytest.raises(InputError, match=f"^demo: {problem}"):
        parse_fortunes(text, "demo")


def test_fortunes_loader_rejects_binary_files(tmp_path, monkeypatch):
    (tmp_path / "garbage").write_bytes(bytes(range(256)))
    monkeypatch.setattr(fortune, "FORTUNES_DIR", tmp_path)
    with pytest.raises(InputError, match="garbage: not UTF-8 text"):
        list(iter_builtin("fortunes"))


# ---------------------------------------------------------------- man pages


def test_man_to_text_macros_and_escapes():
    groff = "\n".join([
        '.\\" A comment line',
        '.TH DEMO 1 2024-01-01 "demo 1.0"',
        ".de XX",
        "this macro definition is not text",
        "..",
        ".ie n .ds Q \\(lq",
        ".el .ds Q ``",
        ".ds V 1.0",
        ".SH NAME",
        "demo \\- show \\fBthings\\fR \\(em quickly",
        ".SH SYNOPSIS",
        ".B demo",
        ".RI [ options ]",
        "file\\&...",
        ".SH DESCRIPTION",
        "Version \\*V prints",
        ".I \"two words\"",
        "and \\f(CWcode\\fP, \\",
        "\\s-1SMALL\\s0 text\\e. \\\" trailing comment",
        ".PP",
        ".TP",
        ".BR \\-v \", \" \\-\\-verbose",
        "Be loud \\[u00E9]t\\['e].",
        ".if t \\{\\",
        "typeset only",
        ".\\}",
        ".nf",
        "  keep   this",
        "  as is",
        ".fi",
        ".TS",
        "tab(:);",
        "l l.",
        "Name:Value",
        "_",
        "alpha:1",
        ".TE",
        ".ig",
        "ignored",
        "..",
        "'quoted' text is text",
    ])
    text = man_to_text(groff, "demo.1")
    assert text == "\n".join([
        "DEMO 1 2024-01-01 demo 1.0",
        "",
        "NAME",
        "demo - show things — quickly",
        "",
        "SYNOPSIS",
        "demo [options] file...",
        "",
        "DESCRIPTION",
        "Version 1.0 prints two words and code, SMALL text\\.",
        "",
        "-v, --verbose",
        "Be loud ét\u00e9.",
        "  keep   this",
        "  as is",
        "Name  Value",
        "alpha  1",
        "'quoted' text is text",
    ])


def test_man_to_text_mdoc():
    groff = "\n".join([
        ".Dd January 1, 2024", ".Dt DEMO 1", ".Os", ".Sh NAME", ".Nm demo", ".Nd show things",
        ".Sh SYNOPSIS", ".Nm", ".Op Fl v", ".Op Fl Fl color Ar when", ".Ar file",
        ".Sh DESCRIPTION", "The", ".Nm", "utility, see", ".Xr ls 1 .",
    ])
    assert man_to_text(groff, "demo.1") == "\n".join([
        "DEMO 1", "", "NAME", "demo - show things", "", "SYNOPSIS", "demo [-v] [--color when] file", "",
        "DESCRIPTION", "The demo utility, see ls(1).",
    ])


def test_man_to_text_rejects_binary():
    with pytest.raises(InputError, match="^demo.1: contains NUL bytes"):
        man_to_text(".TH DEMO 1\n\x00\x00\x01", "demo.1")


def test_manuals_loader_rejects_broken_pages(tmp_path, monkeypatch):
    section = tmp_path / "man1"
    section.mkdir()
    (section / "good.1.gz").write_bytes(gzip.compress(b".TH GOOD 1\n.SH NAME\ngood \\- fine\n"))
    (section / "redirect.1.gz").write_bytes(gzip.compress(b'.\\" moved\n.so man1/good.1\n'))
    (section / "link.1.gz").symlink_to(section / "good.1.gz")
    (section / "other.1.gz").write_bytes(gzip.compress(b".TH OTHER 1\nnot from the package\n"))
    listing = tmp_path / "manpages.list"
    listing.write_text("".join(f"/usr/share/man/man1/{page}\n" for page in
                               ("good.1.gz", "redirect.1.gz", "link.1.gz", "zz.1.gz")) + "/usr/share/man/man1\n")
    monkeypatch.setattr(man, "MAN_DIR", tmp_path)
    monkeypatch.setattr(man, "MAN_PACKAGE_LIST", listing)
    assert list(iter_builtin("manuals")) == [("manuals/man1/good.1", "GOOD 1\n\nNAME\ngood - fine")]

    (section / "zz.1.gz").write_bytes(b".TH PLAIN 1\nnot compressed\n")
    with pytest.raises(InputError, match=r"zz\.1\.gz: not a valid gzip file"):
        list(iter_builtin("manuals"))
    (section / "zz.1.gz").write_bytes(gzip.compress(b".TH BAD 1\n\xff\xfe latin-1 \xe9\n"))
    with pytest.raises(InputError, match=r"zz\.1\.gz: not UTF-8 text"):
        list(iter_builtin("manuals"))

