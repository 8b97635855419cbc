"""`sparsity_profile: owl` in runs (issue 20 item 3): OWL's per-layer counts pruned
exactly by every mask chooser, the model's average exactly the target, the Σx² it
allocates from accumulated across domains and recorded, replay bit-identical."""

import math

import pytest
import torch

from conftest import small_config
from copal.admm import admm_prune
from copal.config import build_config
from copal.continual import ContinualRun
from copal.errors import InputError
from copal.masks import Structure, row_counts, select_mask
from copal.model import all_prunable
from copal.obs import sparsegpt_prune
from copal.state import StepState


def _layer(rows=24, cols=160, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(400, cols, generator=generator) * torch.logspace(-1, 1, cols)
    return torch.randn(rows, cols, generator=generator), x.t() @ x


@pytest.mark.parametrize("scope", ["row", "layer"])
@pytest.mark.parametrize("chooser", ["sparsegpt", "admm", "score"])
def test_every_mask_chooser_prunes_exactly_an_allocated_count(scope, chooser):
    weight, hessian = _layer()
    pruned = 2231  # 58.1 %: not a whole number of weights per row
    structure = Structure(pruned / weight.numel(), scope=scope, pruned=pruned)
    if chooser == "sparsegpt":
        keep, _ = sparsegpt_prune(weight, hessian, structure, None, blocksize=32)
    elif chooser == "admm":
        keep, _ = admm_prune(weight, hessian, structure)
    else:
        keep = select_mask(weight.abs(), structure)
    assert int((~keep).sum()) == pruned
    if scope == "row":
        assert torch.equal((~keep).sum(1), row_counts(pruned, *weight.shape))


def test_without_an_allocated_count_sparsegpt_prunes_as_before():
    weight, hessian = _layer()
    keep, _ = sparsegpt_prune(weight, hessian, Structure(0.58), None, blocksize=32)
    assert ((~keep).sum(1) == round(0.58 * 160)).all()


def test_an_owl_run_prunes_the_target_exactly_and_accumulates_its_energy(tmp_path, llama_dir, corpus_dir, data_dir):
    domains = small_config(llama_dir, corpus_dir)["domains"][:2]
    config = build_config(small_config(llama_dir, corpus_dir, domains=domains, sparsity=0.6,
                                       sparsity_profile="owl", owl={"lam": 0.1, "m": 3}))
    run = ContinualRun(config, tmp_path / "run")
    run.run()
    names = list(all_prunable(run.session.execution.model))
    states = [StepState(tmp_path / f"run/steps/{step}") for step in (1, 2)]
    for state in states:
        masks = {name: state.mask(name) for name in names}
        total = sum(mask.numel() for mask in masks.values())
        assert sum(int((~mask).sum()) for mask in masks.values()) == round(0.6 * total)
        sparsity = {name: float((~mask).float().mean()) for name, mask in masks.items()}
        slack = {name: 1 / mask.shape[1] for name, mask in masks.items()}  # stacked q/k/v: a weight per row
        assert all(0.5 - slack[name] <= s <= 0.7 + slack[name] for name, s in sparsity.items())
        assert max(sparsity.values()) - min(sparsity.values()) > 0.02  # not uniform
    for name in names:  # each step adds its domain's Σx² per token to its parent's
        first, second = states[0].energy(name), states[1].energy(name)
        assert first.shape == (math.prod(run.session.execution.dense.get(name).shape[1:]),)
        assert (second >= first).all() and not torch.equal(second, first)
    assert run.replay(2).differing == [] and run.replay(2).files == []


def test_owl_is_unstructured_only_and_its_lambda_fits_the_target(llama_dir, corpus_dir):
    with pytest.raises(InputError, match="unstructured sparsity only"):
        build_config(small_config(llama_dir, corpus_dir, structure="2:4", sparsity_profile="owl"))
    with pytest.raises(InputError, match="owl.lam 0.3"):
        build_config(small_config(llama_dir, corpus_dir, sparsity=0.8, sparsity_profile="owl", owl={"lam": 0.3}))
    uniform = build_config(small_config(llama_dir, corpus_dir))
    assert uniform.sparsity_profile == "uniform" and uniform.owl.lam == 0.08 and uniform.owl.m == 5
