"""The typed records (copal.records) read what older copal versions wrote and dump
back exactly the JSON they were built from."""

import json

import pytest

from copal.errors import InputError
from copal.records import BenchCell, RunMetrics, StepRecord
from copal.state import StepState
from copal.tokens import TextStart

# A step.json as copal writes it now (key order as on disk), with lm-eval tasks.
CURRENT = {
    "step": 2, "parent": 1, "index": 2, "domain": "beta", "source": "text:/data/beta.txt", "fingerprint": "ab12",
    "method": "copal", "regime": "accumulate", "structure": "unstructured", "sparsity_target": 0.5, "seed": 0,
    "code_revision": "71883d5", "tokenization": {"prefix_ids": [1], "prefix": ["<s>"]},
    "environment": {"torch": "2.5.1", "threads": 2, "device": "cpu", "dtype": "float32"},
    "ppl": {"alpha": 31.25, "beta": 28.5}, "eval_tokens": {"alpha": 4096, "beta": 4096},
    "sparsity": 0.5, "layer_sparsity": {"model.layers.0.mlp.up_proj": 0.5},
    "prune_seconds": 1.25, "seconds": 3.5, "peak_rss_mb": 812.0,
    "tasks": {"tiny": {"acc": 0.5, "acc_stderr": "N/A"}}, "task_items": {"tiny": {"items": 6, "sha256": "ff"}},
    "files": {"masks.safetensors": "00"},
}
# What a step recorded before digests, the environment and the tokenization existed.
OLD = {"step": 1, "parent": 0, "index": 1, "domain": "alpha", "source": "text:/data/alpha.txt",
       "fingerprint": "cd34", "method": "wanda", "regime": "reprune", "structure": "2:4", "sparsity_target": 0.5,
       "seed": 0, "code_revision": "unknown", "ppl": {"alpha": 40.0}, "sparsity": 0.5, "layer_sparsity": {},
       "prune_seconds": 0.5, "seconds": 1.0, "peak_rss_mb": 500.5}


def _write(folder, record):
    folder.mkdir(parents=True)
    (folder / "step.json").write_text(json.dumps(record, indent=1) + "\n")
    return folder


@pytest.mark.parametrize("raw", [CURRENT, OLD], ids=["current", "old"])
def test_a_step_record_dumps_back_to_the_json_it_was_read_from(raw):
    record = StepRecord.model_validate(raw)
    assert json.dumps(record.as_json(), indent=1) == json.dumps(raw, indent=1)


def test_an_old_step_reads_with_the_defaults_of_what_it_lacks(tmp_path):
    state = StepState(_write(tmp_path / "1", OLD), required=("step", "parent", "domain", "fingerprint", "ppl"))
    record = state.record
    assert (record.domain, record.ppl, record.peak_rss_mb) == ("alpha", {"alpha": 40.0}, 500.5)
    assert record.files is None and not state.has_digests
    assert record.environment is None and record.tasks is None and record.eval_tokens == {}
    assert TextStart.from_record(record.tokenization) == TextStart()  # no prefix was the convention then
    assert "files" not in record.as_json() and "environment" not in record.as_json()


def test_unknown_keys_are_kept_and_bad_types_are_one_line(tmp_path):
    newer = StepRecord.model_validate(CURRENT | {"from_the_future": [1, 2]})
    assert list(newer.as_json())[-1] == "from_the_future"
    with pytest.raises(InputError, match=r"steps/3/step.json: corrupt step record \(parent: "):
        StepState(_write(tmp_path / "steps/3", {"step": 3, "parent": "2", "domain": "x"}))
    with pytest.raises(InputError, match=r"lacks one of step, parent, domain"):
        StepState(_write(tmp_path / "steps/4", {"step": 4, "parent": 3}), required=("step", "parent", "domain"))


def test_metrics_and_a_bench_cell_dump_back_in_order():
    steps = [{"step": 1, "domain": "alpha", "seconds": 1.0, "prune_seconds": 0.5, "peak_rss_mb": 500.5,
              "sparsity": 0.5}]
    metrics = {"model": "m", "method": "copal", "regime": "accumulate", "structure": "unstructured",
               "sparsity": 0.5, "seqlen": 128, "domains": ["alpha", "beta"], "dense_ppl": [30.0, 25.0],
               "ppl": [[31.0, None]], "bwt": None, "avg_ppl": 31.0, "steps": steps}
    with_tasks = metrics | {"steps": [steps[0] | {"tasks": None}], "dense_tasks": None}
    for raw in (metrics, with_tasks):
        assert json.dumps(RunMetrics.model_validate(raw).as_json()) == json.dumps(raw)
    parsed = RunMetrics.model_validate(metrics)
    assert parsed.steps[0].label == "1: alpha" and parsed.bwt is None
    cell = BenchCell(id="copal-accumulate-u50", label="copal/accumulate", method="copal", regime="accumulate",
                     structure="unstructured", sparsity=0.5, variant="", options={}, domains=parsed.domains,
                     dense_ppl=parsed.dense_ppl, ppl=parsed.ppl, bwt=parsed.bwt, avg_ppl=parsed.avg_ppl,
                     steps=parsed.steps)
    assert cell.as_json()["steps"] == steps
