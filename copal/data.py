"""Data sources → Arrow datasets with deterministic splits.

A source spec names where text comes from (copal.sources). Ingestion reads it
once into an Arrow IPC file holding one row per document (`doc_id`, `text`,
`part`), ordered by the document hash, with a content fingerprint in the file's
metadata. Calibration and evaluation draw tokens from that file only
(copal.windows).
"""

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from copal import splits
from copal.errors import InputError
from copal.paths import state_home
from copal.sources import Source, parse_source, read_documents, source_signature


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
