"""Data sources: a spec names where a domain's text comes from (`parse_source`), and
each kind of source has a reader that yields its documents as (doc_id, text) pairs.
copal.data ingests them into Arrow; `source_signature` says when that must be redone.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa

from copal.errors import InputError
from copal.names import NAME_RULE, check_name, is_safe_name, safe_example

SOURCE_KINDS = ("builtin", "text", "jsonl", "parquet", "hf")


@dataclass(frozen=True)
class Source:
    spec: str  # as the user wrote it
    kind: str
    location: str  # path, builtin name or dataset id
    name: str  # the domain's short name (column of the PPL matrix)
    column: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"


def _stem(location: str) -> str:
    path = Path(location.rstrip("/"))
    return path.name.split(".")[0] or "data"


def parse_source(spec: str) -> Source:
    """`[NAME=]KIND:LOCATION[...]`, KIND one of builtin, text, jsonl, parquet, hf.

    jsonl:PATH[:FIELD] (default field "text"), parquet:PATH[:COLUMN] (default
    "text"), hf:DATASET[/CONFIG][:SPLIT][:COLUMN] (DATASET may be a local folder,
    including one written by `Dataset.save_to_disk`).
    """
    name = None
    head, eq, rest = spec.partition("=")
    if eq and ":" not in head and head:
        name, spec_body = head, rest
    else:
        spec_body = spec
    kind, colon, location = spec_body.partition(":")
    if not colon or kind not in SOURCE_KINDS:
        raise InputError(f"{spec}: unknown data source; expected one of {', '.join(k + ':' for k in SOURCE_KINDS)}")
    if not location:
        raise InputError(f"{spec}: empty location")
    column = hf_config = None
    hf_split = "train"
    if kind in ("jsonl", "parquet"):
        column = "text"
        if not Path(location).exists() and ":" in location:
            location, column = location.rsplit(":", 1)
    elif kind == "hf":
        dataset, *extra = location.split(":")
        if len(extra) > 2:
            raise InputError(f"{spec}: expected hf:DATASET[/CONFIG][:SPLIT][:COLUMN]")
        hf_split = extra[0] if extra and extra[0] else "train"
        column = extra[1] if len(extra) > 1 else "text"
        if not Path(dataset).exists() and dataset.count("/") >= 1:
            dataset, hf_config = dataset.rsplit("/", 1)
        location = dataset
    if name is None:
        name = location if kind == "builtin" else _stem(location)
        if not is_safe_name(name):
            raise InputError(f"{spec}: the domain name {name[:80]!r} taken from the source is not a valid name "
                             f"({NAME_RULE}); name it, e.g. {safe_example(name)}={spec}")
    else:
        check_name(name, f"{spec[:200]}: domain name")
    return Source(spec, kind, location, name, column, hf_config, hf_split)


# ----------------------------------------------------------------------------- reading


def _utf8_name(path: Path, spec: str) -> str:
    """`path` as text; a file name that is not UTF-8 is bad input (it could not be recorded)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{spec}: file name {ascii(str(path))} is not UTF-8; rename it") from None
    return str(path)


def _text_paragraphs(path: Path, root: Path) -> Iterator[tuple[str, str]]:
    try:
        content = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    rel = path.relative_to(root).as_posix() if path != root else path.name
    for index, paragraph in enumerate(content.split("\n\n")):
        if paragraph.strip():
            yield f"{rel}#{index}", paragraph.strip("\n")


def _read_text(source: Source) -> Iterator[tuple[str, str]]:
    path = Path(source.location)
    if path.is_file():
        yield from _text_paragraphs(path, path)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise InputError(f"{source.spec}: no .txt files in {path}")
        for file in files:
            yield from _text_paragraphs(file, path)
    else:
        raise InputError(f"{source.spec}: {path} not found")


def _read_jsonl(source: Source) -> Iterator[tuple[str, str]]:
    path = Path(source.location)
    if not path.is_file():
        raise InputError(f"{source.spec}: {path} not found")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(record, dict) or source.column not in record:
                raise InputError(f"{path}:{number}: no field {source.column!r}")
            text = record[source.column]
            if not isinstance(text, str):
                raise InputError(f"{path}:{number}: field {source.column!r} is not a string")
            yield f"line:{number}", text


def _column_rows(table_column: Iterable, spec: str, column: str) -> Iterator[tuple[str, str]]:
    for index, text in enumerate(table_column):
        if text is not None and not isinstance(text, str):
            raise InputError(f"{spec}: column {column!r} is not text")
        yield f"row:{index}", text or ""


def _read_parquet(source: Source) -> Iterator[tuple[str, str]]:
    import pyarrow.parquet as pq

    path = Path(source.location)
    if not path.exists():
        raise InputError(f"{source.spec}: {path} not found")
    try:
        schema = pq.read_schema(path) if path.is_file() else pq.ParquetDataset(path).schema
    except (pa.ArrowException, OSError) as error:
        raise InputError(f"{source.spec}: not a readable Parquet file ({error})") from None
    if source.column not in schema.names:
        raise InputError(f"{source.spec}: no column {source.column!r} (columns: {', '.join(schema.names)})")
    table = pq.read_table(path, columns=[source.column])
    yield from _column_rows(table.column(source.column).to_pylist(), source.spec, source.column)


def _load_hf(source: Source):
    import datasets

    location = Path(source.location)
    try:
        if (location / "state.json").is_file() or (location / "dataset_dict.json").is_file():
            loaded = datasets.load_from_disk(str(location))
            if isinstance(loaded, datasets.DatasetDict):
                if source.hf_split not in loaded:
                    raise InputError(f"{source.spec}: no split {source.hf_split!r} (splits: {', '.join(loaded)})")
                loaded = loaded[source.hf_split]
            return loaded
        return datasets.load_dataset(source.location, source.hf_config, split=source.hf_split)
    except InputError:
        raise
    except Exception as error:  # the hub client raises many types; all mean "cannot read this source"
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(f"{source.spec}: cannot load dataset ({first_line})") from None


def _read_hf(source: Source) -> Iterator[tuple[str, str]]:
    dataset = _load_hf(source)
    if source.column not in dataset.column_names:
        raise InputError(f"{source.spec}: no column {source.column!r} (columns: {', '.join(dataset.column_names)})")
    yield from _column_rows(dataset[source.column], source.spec, source.column)


def _read_builtin(source: Source) -> Iterator[tuple[str, str]]:
    from copal import corpora

    yield from corpora.iter_builtin(source.location)


_READERS = {"builtin": _read_builtin, "text": _read_text, "jsonl": _read_jsonl,
            "parquet": _read_parquet, "hf": _read_hf}


def read_documents(source: Source) -> Iterator[tuple[str, str]]:
    """(doc_id, text) pairs of a source, empty texts dropped."""
    for doc_id, text in _READERS[source.kind](source):
        if text.strip():
            yield doc_id, text


# Bumped whenever ingestion's output changes for the same input, so caches expire.
_INGEST_VERSION = "2"


def source_signature(source: Source) -> str:
    """A cheap stamp of the raw input; a cached Arrow file is reused while it matches."""
    raw = _raw_signature(source)
    return f"{_INGEST_VERSION}:{raw}" if raw else ""


def _raw_signature(source: Source) -> str:
    if source.kind == "builtin":
        from copal import corpora

        return corpora.builtin_signature(source.location)
    if source.kind == "hf":
        return ""  # no cheap stamp: always re-read; the datasets cache makes that cheap
    path = Path(source.location)
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    stamp = hashlib.sha256()
    for file in files:
        if file.is_file():
            info = file.stat()
            stamp.update(f"{_utf8_name(file, source.spec)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return stamp.hexdigest()
