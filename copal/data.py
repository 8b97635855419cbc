"""Data sources → Arrow datasets with deterministic splits → token blocks.

A source spec names where text comes from (see `parse_source`). Ingestion reads
it once into an Arrow IPC file holding one row per document (`doc_id`, `text`,
`part`), ordered by the document hash, with a content fingerprint in the file's
metadata. Calibration and evaluation draw tokens from that file only.
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import torch

from copal import splits
from copal.errors import InputError
from copal.names import NAME_RULE, check_name, is_safe_name, safe_example
from copal.paths import state_home
from copal.tokens import TextStart, text_start

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


# ----------------------------------------------------------------------------- ingestion


@dataclass(frozen=True)
class Domain:
    """An ingested source: its Arrow file and content fingerprint."""

    source: Source
    path: Path
    fingerprint: str
    counts: dict[str, int]

    @property
    def name(self) -> str:
        return self.source.name

    def texts(self, part: str) -> list[str]:
        """The documents of one part, in the stored (hash) order."""
        with pa.memory_map(str(self.path)) as stream:
            table = pa.ipc.open_file(stream).read_all()
        mask = pc.equal(table.column("part"), part)
        return table.filter(mask).column("text").to_pylist()


def _fingerprint(rows: list[tuple[str, str, str]]) -> str:
    digest = hashlib.sha256()
    for doc_id, part, text in rows:
        digest.update(doc_id.encode() + b"\0" + part.encode() + b"\0" + text.encode() + b"\0")
    return digest.hexdigest()[:16]


def _cache_path(source: Source, data_dir: Path) -> Path:
    """Builtin domains get fixed names (DVC tracks them; `corpora` knows every one);
    other sources are keyed by a hash of where they come from, so two sources never
    share a file and no user text reaches the path. Always inside `data_dir`."""
    if source.kind == "builtin":
        from copal.corpora import BUILTIN_NAMES

        if source.location not in BUILTIN_NAMES:
            raise InputError(f"{source.spec}: unknown builtin domain; choose one of {', '.join(BUILTIN_NAMES)}")
        path = data_dir / "builtin" / f"{source.location}.arrow"
    else:
        where = f"{source.kind}:{source.location}:{source.column}:{source.hf_config}:{source.hf_split}"
        path = data_dir / f"{source.kind}-{hashlib.sha256(where.encode('utf-8', 'surrogateescape')).hexdigest()[:20]}.arrow"
    if not path.resolve().is_relative_to(data_dir.resolve()):
        raise InputError(f"{source.spec}: its cache file would lie outside {data_dir}")
    return path


def _read_cached(path: Path, signature: str) -> tuple[str, dict] | None:
    if not signature or not path.is_file():
        return None
    try:
        with pa.memory_map(str(path)) as stream:
            meta = pa.ipc.open_file(stream).schema.metadata or {}
    except pa.ArrowException:
        return None  # a damaged cache is rebuilt, never trusted
    if meta.get(b"signature", b"").decode() != signature:
        return None
    return meta[b"fingerprint"].decode(), json.loads(meta[b"counts"])


def arrow_dir(data_dir: Path | None = None) -> Path:
    """The Arrow cache: `data_dir`, else $COPAL_DATA_DIR, else data/arrow under
    copal.paths.state_home() ($COPAL_HOME or the working directory)."""
    return Path(data_dir or os.environ.get("COPAL_DATA_DIR") or state_home() / "data" / "arrow")


def ingest(source: Source | str, data_dir: Path | None = None) -> Domain:
    """Read a source into an Arrow file (once) and return it with its fingerprint."""
    source = parse_source(source) if isinstance(source, str) else source
    data_dir = arrow_dir(data_dir)
    path = _cache_path(source, data_dir)
    signature = source_signature(source)
    cached = _read_cached(path, signature)
    if cached:
        return Domain(source, path, *cached)

    fractions = splits.BUILTIN_FRACTIONS if source.kind == "builtin" else splits.USER_FRACTIONS
    rows = []
    seen_ids, seen_texts = set(), set()
    for doc_id, text in read_documents(source):
        if doc_id in seen_ids:
            raise InputError(f"{source.spec}: duplicate document id {doc_id!r}")
        seen_ids.add(doc_id)
        # A text seen before (the same fortune in two files, say) is dropped, so
        # no text can sit in both the calibration and the evaluation part.
        digest = hashlib.sha256(text.encode()).digest()
        if digest in seen_texts:
            continue
        seen_texts.add(digest)
        rows.append((splits.doc_hash(doc_id), doc_id, splits.split_of(doc_id, fractions), text))
    if not rows:
        raise InputError(f"{source.spec}: empty domain (no non-empty documents)")
    rows.sort()
    triples = [(doc_id, part, text) for _, doc_id, part, text in rows]
    counts = {part: sum(1 for _, p, _ in triples if p == part) for part in fractions}
    for part in (splits.CALIBRATION, splits.EVALUATION):
        if counts[part] == 0:
            raise InputError(f"{source.spec}: only {len(rows)} document(s); too few to fill a {part} part")
    fingerprint = _fingerprint(triples)
    table = pa.table({"doc_id": [r[0] for r in triples], "part": [r[1] for r in triples],
                      "text": pa.array([r[2] for r in triples], pa.large_string())})
    table = table.replace_schema_metadata({"spec": source.spec, "fingerprint": fingerprint,
                                           "signature": signature, "counts": json.dumps(counts)})
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    try:
        with pa.OSFile(str(partial), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return Domain(source, path, fingerprint, counts)


# ----------------------------------------------------------------------------- tokens


def token_stream(texts: list[str], tokenizer, min_tokens: int) -> torch.Tensor:
    """Tokens of `"\\n\\n".join(texts)`, or of a prefix of the documents long enough
    to give at least `min_tokens` tokens (tokenising megabytes we then drop is waste)."""
    chars = max(4 * min_tokens, 4096)
    while True:
        prefix, total = [], 0
        for text in texts:
            prefix.append(text)
            total += len(text) + 2
            if total >= chars:
                break
        ids = tokenizer("\n\n".join(prefix), add_special_tokens=False)["input_ids"]
        if len(ids) >= min_tokens or len(prefix) == len(texts):
            return torch.tensor(ids, dtype=torch.long)
        chars *= 2


def _with_start(windows: torch.Tensor, start: TextStart) -> torch.Tensor:
    """`windows` (count, text tokens) with the tokenizer's start tokens before each."""
    if not start.ids:
        return windows
    prefix = torch.tensor(start.ids, dtype=windows.dtype).expand(len(windows), len(start.ids))
    return torch.cat([prefix, windows], dim=1)


def _text_length(domain: Domain, seqlen: int, start: TextStart) -> int:
    length = seqlen - len(start.ids)
    if length < 2:
        raise InputError(f"{domain.source.spec}: seqlen={seqlen} leaves {length} text token(s) after the "
                         f"tokenizer's start tokens {list(start.tokens)}; need at least 2")
    return length


def calibration_samples(domain: Domain, tokenizer, nsamples: int, seqlen: int, seed: int,
                        start: TextStart | None = None) -> torch.Tensor:
    """`nsamples` windows of `seqlen` tokens at seeded random offsets of the
    calibration part → LongTensor (nsamples, seqlen). Each starts with the
    tokenizer's start tokens (`start`, default: `copal.tokens.text_start`), if any,
    followed by text."""
    start = text_start(tokenizer) if start is None else start
    length = _text_length(domain, seqlen, start)
    stream = token_stream(domain.texts(splits.CALIBRATION), tokenizer, 8 * nsamples * length)
    if len(stream) <= length:
        raise InputError(f"{domain.source.spec}: calibration part has {len(stream)} tokens; "
                         f"need more than seqlen={seqlen}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(stream) - length + 1, (nsamples,), generator=generator)
    return _with_start(torch.stack([stream[s : s + length] for s in starts.tolist()]), start)


def evaluation_windows(domain: Domain, tokenizer, seqlen: int, max_tokens: int,
                       start: TextStart | None = None) -> torch.Tensor:
    """Non-overlapping windows over the evaluation part (at most `max_tokens` text
    tokens, remainder dropped) → LongTensor (nwindows, seqlen): each the tokenizer's
    start tokens (`start`, default: `copal.tokens.text_start`), if any, then the
    next `seqlen - len(start)` text tokens, so exactly the text tokens are predicted."""
    start = text_start(tokenizer) if start is None else start
    length = _text_length(domain, seqlen, start)
    stream = token_stream(domain.texts(splits.EVALUATION), tokenizer, max_tokens)[:max_tokens]
    nwindows = len(stream) // length
    if nwindows == 0:
        raise InputError(f"{domain.source.spec}: evaluation part has {len(stream)} tokens; "
                         f"need at least seqlen={seqlen}")
    return _with_start(stream[: nwindows * length].view(nwindows, length), start)
