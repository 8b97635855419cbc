"""Data sources → Arrow: splits, fingerprints, token blocks, errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from copal import splits
from copal.data import ingest
from copal.sources import parse_source
from copal.windows import calibration_samples, evaluation_windows
from copal.errors import InputError


def _paragraphs(n):
    return [f"Paragraph {i}: the quick brown fox number {i} jumps over {i * 7} lazy dogs." for i in range(n)]


def test_parse_source_forms(tmp_path):
    assert parse_source("builtin:docs").name == "docs"
    s = parse_source("legal=text:/data/contracts/")
    assert (s.name, s.kind, s.location) == ("legal", "text", "/data/contracts/")
    s = parse_source("jsonl:/x/med.jsonl:body")
    assert (s.location, s.column, s.name) == ("/x/med.jsonl", "body", "med")
    s = parse_source("hf:wikitext/wikitext-2-raw-v1:test:text")
    assert (s.location, s.hf_config, s.hf_split, s.column) == ("wikitext", "wikitext-2-raw-v1", "test", "text")
    with pytest.raises(InputError, match="unknown data source"):
        parse_source("ftp:/x")


def test_text_folder_split_is_disjoint_deterministic_and_fingerprinted(tmp_path, data_dir):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "a.txt").write_text("\n\n".join(_paragraphs(60)))
    (folder / "b.txt").write_text("\n\n".join(_paragraphs(90)[60:]))
    domain = ingest(f"text:{folder}")
    table = pa.ipc.open_file(pa.memory_map(str(domain.path))).read_all().to_pylist()
    ids = [row["doc_id"] for row in table]
    assert len(ids) == len(set(ids)) == 90
    calibration, evaluation = set(domain.texts("calibration")), set(domain.texts("evaluation"))
    assert calibration and evaluation and not calibration & evaluation
    for row in table:
        assert row["part"] == splits.split_of(row["doc_id"], splits.USER_FRACTIONS)
    again = ingest(f"text:{folder}", tmp_path / "other-cache")
    assert again.fingerprint == domain.fingerprint
    (folder / "b.txt").write_text("\n\n".join(_paragraphs(91)[60:]))
    assert ingest(f"text:{folder}").fingerprint != domain.fingerprint


def test_builtin_split_has_three_disjoint_parts():
    ids = [f"doc/{i}" for i in range(5000)]
    parts = [splits.split_of(i, splits.BUILTIN_FRACTIONS) for i in ids]
    share = {p: parts.count(p) / len(ids) for p in set(parts)}
    assert share.keys() == {"train", "calibration", "evaluation"}
    assert 0.77 < share["train"] < 0.83 and 0.08 < share["evaluation"] < 0.12


def test_jsonl_parquet_and_hf_local_sources(tmp_path, data_dir):
    texts = _paragraphs(40)
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": t, "n": i}) for i, t in enumerate(texts)))
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": texts}), parquet)
    import datasets

    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    hub_like = tmp_path / "hub_like"
    hub_like.mkdir()
    pq.write_table(pa.table({"text": texts}), hub_like / "train.parquet")
    fingerprints = []
    for spec in (f"jsonl:{jsonl}:body", f"parquet:{parquet}:content", f"hf:{tmp_path / 'saved'}:train:text",
                 f"hf:{hub_like}:train:text"):
        domain = ingest(spec)
        assert sorted(domain.texts("calibration") + domain.texts("evaluation")) == sorted(texts), spec
        fingerprints.append(domain.fingerprint)
    # rows are ids row:N in Parquet and datasets, line:N in JSONL
    assert fingerprints[1] == fingerprints[2] == fingerprints[3] != fingerprints[0]

@pytest.mark.parametrize("spec,content,message", [
    ("jsonl:{p}:body", '{"text": "x"}\n', "no field 'body'"),
    ("jsonl:{p}", '{"text": "x"\n', "not valid JSON"),
    ("parquet:{p}:body", None, "no column 'body'"),
    ("text:{p}", "", "empty domain"),
    ("text:{p}", "just one paragraph", "too few"),
    ("text:{p}/missing.txt", None, "not found"),
])
def test_bad_sources_are_input_errors(tmp_path, data_dir, spec, content, message):
    path = tmp_path / "input"
    if spec.startswith("parquet"):
        pq.write_table(pa.table({"text": ["a", "b"]}), path)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message):
        ingest(spec.format(p=path))


def test_token_blocks(tmp_path, data_dir, tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    (tmp_path / "t.txt").write_text("\n\n".join(_paragraphs(400)))
    domain = ingest(f"text:{tmp_path / 't.txt'}")
    samples = calibration_samples(domain, tokenizer, 6, 32, seed=0)
    assert samples.shape == (6, 32)
    assert torch.equal(samples, calibration_samples(domain, tokenizer, 6, 32, seed=0))
    assert not torch.equal(samples, calibration_samples(domain, tokenizer, 6, 32, seed=1))
    windows = evaluation_windows(domain, tokenizer, 32, 1000)
    assert windows.shape == (1000 // 32, 32)
    joined = tokenizer("\n\n".join(domain.texts("evaluation")), add_special_tokens=False)["input_ids"]
    assert windows.reshape(-1).tolist() == joined[: windows.numel()]
    with pytest.raises(InputError, match="need more than seqlen"):
        calibration_samples(domain, tokenizer, 1, 10**6, seed=0)


@pytest.mark.parametrize("name", ["docs", "lexicon", "code", "fortunes", "manuals"])
def test_builtin_parts_are_disjoint_on_ids_and_text(name):
    domain = ingest(f"builtin:{name}")  # the project's DVC-tracked Arrow cache
    table = pa.ipc.open_file(pa.memory_map(str(domain.path))).read_all()
    ids, texts = {}, {}
    for doc_id, part, text in zip(*(table.column(c).to_pylist() for c in ("doc_id", "part", "text"))):
        ids.setdefault(part, set()).add(doc_id)
        texts.setdefault(part, set()).add(text)
    assert ids.keys() == {"train", "calibration", "evaluation"}
    for a, b in (("train", "calibration"), ("train", "evaluation"), ("calibration", "evaluation")):
        assert not ids[a] & ids[b], (a, b)
        assert not texts[a] & texts[b], (a, b)
    assert sum(len(v) for v in ids.values()) == table.num_rows == sum(domain.counts.values())
