"""Builtin text domains, read from real files that Debian packages install.

Five domains, each parsed from its native format into documents
``(doc_id, text)`` by one module of this package:

========  =====================================  ========================  =======
name      source                                 Debian package            module
========  =====================================  ========================  =======
docs      GNU info manual of Python 3.11         python3.11-doc            info
lexicon   WordNet as a dictd database            dict-wn                   dictd
code      stdlib sources of the running Python   (the interpreter itself)  stdlib
fortunes  fortune cookie files                   fortunes                  fortune
manuals   groff man pages, man1 ... man8         manpages (and others)     man
========  =====================================  ========================  =======

The man pages' groff language is in roff, their mdoc macros in mdoc, and the
reading of raw files (gzip, UTF-8, a missing package) in files. This module
is the registry: which module a ``builtin:NAME`` source reads.

Each domain's module has ``sources()`` (the raw files, in reading order; it
raises at once when they are missing) and ``documents(paths)``. Every format
has a public parser that takes already-read content, so malformed input can be
tested without the real files; each raises :class:`InputError` with one line
naming the input and what is wrong with it.
"""

import hashlib
from collections.abc import Iterator
from pathlib import Path

from copal.corpora import dictd, fortune, info, man, stdlib
from copal.errors import InputError

_DOMAINS = {"docs": info, "lexicon": dictd, "code": stdlib, "fortunes": fortune, "manuals": man}
BUILTIN_NAMES: tuple[str, ...] = tuple(_DOMAINS)

# Bumped whenever parsing changes, so cached parses keyed by the signature expire.
_PARSER_VERSION = "2"


def iter_builtin(name: str) -> Iterator[tuple[str, str]]:
    """Documents of builtin domain `name` in a deterministic order.

    An unknown name or missing files raise InputError at once, before the first
    document is read; errors in the files themselves surface while iterating.
    """
    sources = _sources(name)
    return _DOMAINS[name].documents(sources)


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
    if name not in _DOMAINS:
        raise InputError(f"builtin:{name}: unknown builtin domain; choose one of {', '.join(BUILTIN_NAMES)}")
    return _DOMAINS[name].sources()
