"""Continual runs end to end on a tiny LLaMA and real text domains."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_config, without_timings
from copal.config import build_config
from copal.continual import ContinualRun
from copal.rundir import RunDir
from copal.export import load_step_model
from copal.model import all_prunable, load_model, weight_matrix


def _run(root, model_dir, corpus_dir, **overrides):
    return ContinualRun(build_config(small_config(model_dir, corpus_dir, **overrides)), root).run()


def _masks(root, step):
    return RunDir(root).step(step)


def _all_masks(root, step):
    state = RunDir(root).step(step)
    return {name: state.mask(name) for name in state.mask_names()}


CASES = [("copal", "accumulate", "unstructured", 0.5), ("copal-output", "accumulate", "unstructured", 0.5),
         ("wanda", "sequential", "2:4", 0.5),
         ("sparsegpt", "reprune", "4:8", 0.5), ("magnitude", "joint", "unstructured", 0.7),
         ("sparsegpt", "sequential", "unstructured", 0.6)]


@pytest.mark.parametrize("method,regime,structure,sparsity", CASES)
def test_every_step_has_exact_sparsity_and_touches_nothing_else(tmp_path, data_dir, llama_dir, corpus_dir,
                                                                 method, regime, structure, sparsity):
    variant = {"method": "copal", "copal": {"sensitivity": "output"}} if method == "copal-output" else {"method": method}
    metrics = _run(tmp_path / "run", llama_dir, corpus_dir, regime=regime, structure=structure, sparsity=sparsity,
                   **variant)
    dense, _ = load_model(str(llama_dir))
    dense_state = dense.state_dict()
    prunable = {f"{name}.weight" for name in all_prunable(dense)}
    assert len(metrics.ppl) == 3 and all(len(row) == 3 for row in metrics.ppl)
    for step in (1, 2, 3):
        model, _ = load_step_model(tmp_path / "run", step)
        for key, tensor in model.state_dict().items():
            if key not in prunable:
                assert torch.equal(tensor, dense_state[key]), key
        for name, module in all_prunable(model).items():
            weight = weight_matrix(module)
            rows, cols = weight.shape
            zero = weight == 0
            if structure == "unstructured":
                assert (zero.sum(1) >= round(sparsity * cols)).all(), name
                mask = RunDir(tmp_path / "run").step(step).mask(name)
                assert ((~mask).sum(1) == round(sparsity * cols)).all(), name
                assert (weight[~mask] == 0).all()
            else:
                n, m = map(int, structure.split(":"))
                assert ((~zero).reshape(rows, -1, m).sum(-1) <= n).all(), name
            if method in ("copal-output", "wanda", "magnitude"):  # kept weights are W0's (copal, sparsegpt: rebuilt)
                dense_weight = weight_matrix(all_prunable(dense)[name])
                assert torch.equal(weight[~zero], dense_weight[~zero])


def test_sequential_never_revives_and_the_dense_regimes_can(tmp_path, data_dir, llama_dir, corpus_dir):
    revived = {}
    for regime in ("sequential", "reprune", "accumulate"):
        root = tmp_path / regime
        _run(root, llama_dir, corpus_dir, method="wanda", regime=regime)
        count = 0
        for step in (2, 3):
            before, after = _all_masks(root, step - 1), _all_masks(root, step)
            count += sum(int((after[n] & ~before[n]).sum()) for n in before)
        revived[regime] = count
    assert revived["sequential"] == 0
    assert revived["reprune"] > 0 and revived["accumulate"] > 0


def test_copal_accumulate_on_one_domain_equals_reprune(tmp_path, data_dir, llama_dir, corpus_dir):
    one = {"domains": [f"text:{corpus_dir / 'alpha'}.txt"], "copal": {"sensitivity": "output"}}
    _run(tmp_path / "acc", llama_dir, corpus_dir, regime="accumulate", **one)
    _run(tmp_path / "rep", llama_dir, corpus_dir, regime="reprune", **one)
    acc, rep = _all_masks(tmp_path / "acc", 1), _all_masks(tmp_path / "rep", 1)
    assert acc.keys() == rep.keys()
    assert all(torch.equal(acc[n], rep[n]) for n in acc)


def test_first_block_statistic_is_independent_of_domain_order(tmp_path, data_dir, llama_dir, corpus_dir):
    """Block 0 sees the same (embedding) inputs whatever was pruned, so its
    accumulated statistic after A→B equals the one after B→A. Deeper blocks see
    the inputs of the currently pruned blocks before them, which do depend on order.
    In float32: a compact state format rounds C_1, which depends on which domain came first."""
    a, b = (f"text:{corpus_dir / n}.txt" for n in ("alpha", "beta"))
    output = {"sensitivity": "output"}  # one statistic per layer (a Hessian is stored once per input)
    _run(tmp_path / "ab", llama_dir, corpus_dir, domains=[a, b], state={"format": "float32"}, copal=output)
    _run(tmp_path / "ba", llama_dir, corpus_dir, domains=[b, a], state={"format": "float32"}, copal=output)
    ab = load_file(tmp_path / "ab/steps/2/sensitivity/block-0000.safetensors")
    ba = load_file(tmp_path / "ba/steps/2/sensitivity/block-0000.safetensors")
    assert ab.keys() == ba.keys() and len(ab) == 7
    for name in ab:
        assert torch.allclose(ab[name], ba[name], rtol=1e-5, atol=0), name


@pytest.mark.parametrize("method", ["copal", "sparsegpt"])
def test_same_config_gives_bit_identical_masks_and_metrics(tmp_path, data_dir, llama_dir, corpus_dir, method):
    first = _run(tmp_path / "a", llama_dir, corpus_dir, method=method)
    second = _run(tmp_path / "b", llama_dir, corpus_dir, method=method)
    assert without_timings(first) == without_timings(second)
    for step in (1, 2, 3):
        masks_a = (tmp_path / f"a/steps/{step}/masks.safetensors").read_bytes()
        assert masks_a == (tmp_path / f"b/steps/{step}/masks.safetensors").read_bytes()


def test_loss_sensitivity_variant_runs_and_differs_from_output(tmp_path, data_dir, llama_dir, corpus_dir):
    _run(tmp_path / "loss", llama_dir, corpus_dir, copal={"sensitivity": "loss"})
    _run(tmp_path / "out", llama_dir, corpus_dir, copal={"sensitivity": "output"})
    loss, out = _all_masks(tmp_path / "loss", 3), _all_masks(tmp_path / "out", 3)
    assert any(not torch.equal(loss[n], out[n]) for n in loss)
    assert all(((~loss[n]).sum(1) == loss[n].shape[1] // 2).all() for n in loss)


def test_reconstruct_variant_keeps_copals_masks_and_replays(tmp_path, data_dir, llama_dir, corpus_dir):
    """copal.reconstruct: block 0 gets exactly plain COPAL's masks (the sensitivity
    part of its statistic is COPAL's; later blocks see the reconstructed earlier
    blocks' outputs), every layer's kept weights are updated, replay is bit-identical.
    Plain COPAL in float32: reconstruct stores its stacked S and H in float32."""
    _run(tmp_path / "plain", llama_dir, corpus_dir, state={"format": "float32"}, copal={"sensitivity": "output"})
    config = build_config(small_config(llama_dir, corpus_dir, copal={"sensitivity": "output", "reconstruct": True}))
    run = ContinualRun(config, tmp_path / "rec")
    run.run()
    plain, rebuilt = _all_masks(tmp_path / "plain", 3), _all_masks(tmp_path / "rec", 3)
    first = [n for n in plain if ".layers.0." in n]
    assert first and all(torch.equal(plain[n], rebuilt[n]) for n in first)
    assert all(((~rebuilt[n]).sum(1) == rebuilt[n].shape[1] // 2).all() for n in rebuilt)
    state = RunDir(tmp_path / "rec").step(3)
    dense = {name: weight_matrix(module) for name, module in all_prunable(load_model(str(llama_dir))[0]).items()}
    changed = [n for n in plain if not torch.equal(state.weight(n, run.session.execution.dense), dense[n] * plain[n])]
    assert changed == list(plain)  # every layer's kept weights were updated
    assert run.replay(3).differing == []
    for bad, needle in (({"reconstruct": True, "sensitivity": "loss"}, "needs sensitivity: output"),
                        ({"sensitivity": "output", "reconstruct": True, "reduce": "max"}, "needs reduce: sum"),
                        ({"reduce": "max"}, "needs reduce: sum")):  # the default, sensitivity: hessian
        with pytest.raises(Exception, match=needle):
            build_config(small_config(llama_dir, corpus_dir, copal=bad))


def test_interrupted_run_resumes_at_first_unrecorded_step(tmp_path, data_dir, llama_dir, corpus_dir):
    config = build_config(small_config(llama_dir, corpus_dir))
    run = ContinualRun(config, tmp_path / "run")
    run.evaluator.dense_ppl()
    run.step(0)
    (tmp_path / "run/steps/.2.partial").mkdir()  # debris of a step that crashed half-way
    step1 = (tmp_path / "run/steps/1/masks.safetensors").stat().st_mtime_ns
    resumed = ContinualRun(config, tmp_path / "run").run()
    assert (tmp_path / "run/steps/1/masks.safetensors").stat().st_mtime_ns == step1
    assert [s.step for s in resumed.steps] == [1, 2, 3]
    assert not (tmp_path / "run/steps/.2.partial").exists()
    fresh = _run(tmp_path / "fresh", llama_dir, corpus_dir)
    assert without_timings(resumed) == without_timings(fresh)


def test_metrics_json_contract(tmp_path, data_dir, llama_dir, corpus_dir):
    metrics = _run(tmp_path / "run", llama_dir, corpus_dir)
    on_disk = json.loads((tmp_path / "run/metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics.as_json()))
    for key in ("model", "method", "regime", "structure", "sparsity", "seqlen", "domains", "dense_ppl", "ppl",
                "bwt", "avg_ppl", "steps"):
        assert key in on_disk
    assert on_disk["domains"] == ["alpha", "beta", "gamma"]
    p = on_disk["ppl"]
    assert on_disk["bwt"] == pytest.approx(((p[2][0] - p[0][0]) + (p[2][1] - p[1][1])) / 2)
    assert on_disk["avg_ppl"] == pytest.approx(sum(p[2]) / 3)
    step = on_disk["steps"][0]
    assert step["sparsity"] == pytest.approx(0.5) and step["peak_rss_mb"] > 0 and step["seconds"] > 0
    assert (tmp_path / "run/HEAD").read_text().strip() == "3"


def test_seen_only_evaluation_is_the_lower_triangle_of_the_full_matrix(tmp_path, data_dir, llama_dir, corpus_dir):
    full = _run(tmp_path / "all", llama_dir, corpus_dir)
    seen = _run(tmp_path / "seen", llama_dir, corpus_dir, evaluation={"domains": "seen"})
    for step, (row_all, row_seen) in enumerate(zip(full.ppl, seen.ppl)):
        assert row_seen[: step + 1] == row_all[: step + 1]
        assert row_seen[step + 1 :] == [None] * (2 - step)
    assert (seen.bwt, seen.avg_ppl) == (full.bwt, full.avg_ppl)
    assert seen.dense_ppl == full.dense_ppl
    assert _masks(tmp_path / "seen", 3).record.ppl.keys() == {"alpha", "beta", "gamma"}
    assert _masks(tmp_path / "seen", 1).record.ppl.keys() == {"alpha"}


def test_known_dense_row_is_recorded_instead_of_measured(tmp_path, data_dir, llama_dir, corpus_dir, monkeypatch):
    config = build_config(small_config(llama_dir, corpus_dir))
    measured = ContinualRun(config, tmp_path / "a").evaluator.dense_ppl()
    known = {"alpha": 1.0, "beta": 2.0}  # gamma is not known: it is measured
    run = ContinualRun(config, tmp_path / "b", known_dense=known)
    assert run.evaluator.dense_ppl() == {"alpha": 1.0, "beta": 2.0, "gamma": measured["gamma"]}
    assert json.loads((tmp_path / "b/dense.json").read_text()) == run.evaluator.dense_ppl()
    again = ContinualRun(config, tmp_path / "b", known_dense={"alpha": 9.0})  # recorded values win
    assert again.evaluator.dense_ppl()["alpha"] == 1.0
