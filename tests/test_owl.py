"""copal.owl: OWL's layer-wise sparsity, exact to the weight."""

import math

import pytest
import torch

from copal.errors import InputError
from copal.masks import Structure, row_counts
from copal.owl import check_structure, layer_mask, outlier_ratio, owl_profile, wanda_score

# Odd sizes: no layer's share of the target is a whole number of weights.
SHAPES = {"q": (37, 53), "o": (53, 37), "up": (91, 53), "down": (53, 91)}


def _blocks(outliers: list[float], seed=0):
    """One block per entry: layers of random weights and input energies, with that
    fraction of weights multiplied by 40 (outliers)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = {}
    for index, fraction in enumerate(outliers):
        layers = {}
        for name, shape in SHAPES.items():
            weight = torch.randn(shape, generator=generator)
            weight[torch.rand(shape, generator=generator) < fraction] *= 40
            layers[f"b{index}.{name}"] = (weight, torch.rand(shape[1], generator=generator) + 0.5)
        blocks[f"b{index}"] = layers
    return blocks


@pytest.mark.parametrize("target", [0.5, 0.7, 0.33])
@pytest.mark.parametrize("lam", [0.0, 0.02, 0.08, 0.2])
def test_average_sparsity_is_exact_to_the_weight_and_bounds_hold(target, lam):
    if lam > min(target, 1 - target):
        pytest.skip("λ outside the allowed range")
    profile = owl_profile(_blocks([0.0, 0.002, 0.01, 0.03, 0.001]), target, lam=lam, m=5)
    total = sum(math.prod(shape) for shape in profile.shapes.values())
    assert sum(profile.pruned.values()) == round(target * total)
    for name, pruned in profile.pruned.items():
        size = math.prod(profile.shapes[name])
        slack = 1 if lam * size < 1 else 1e-9  # λ = 0: the nearest whole counts, within one weight
        assert size * (target - lam) - slack <= pruned <= size * (target + lam) + slack, name
    for sparsity in profile.block_sparsity.values():
        assert target - lam - 1e-12 <= sparsity <= target + lam + 1e-12


def test_more_outliers_mean_lower_sparsity():
    outliers = [0.03, 0.0, 0.01, 0.002, 0.02]
    profile = owl_profile(_blocks(outliers), 0.5, lam=0.08, m=5)
    ranked_by_ratio = sorted(profile.ratios, key=profile.ratios.get)
    assert ranked_by_ratio == [f"b{i}" for i in sorted(range(5), key=outliers.__getitem__)]
    sparsities = [profile.block_sparsity[block] for block in ranked_by_ratio]
    assert sparsities == sorted(sparsities, reverse=True) and sparsities[0] > sparsities[-1]
    assert 0.08 < max(sparsities) - min(sparsities) <= 0.16 + 1e-12  # at most 2λ (one end may clip)
    assert min(sparsities) == pytest.approx(0.42) or max(sparsities) == pytest.approx(0.58)
    assert profile.sparsity("b0.q") < profile.sparsity("b1.q")


def test_equal_ratios_or_zero_lambda_give_uniform_sparsity():
    profile = owl_profile(_blocks([0.01, 0.01, 0.01]), 0.5, lam=0.0)
    assert set(profile.block_sparsity.values()) == {0.5}
    for name, shape in profile.shapes.items():
        assert abs(profile.pruned[name] - 0.5 * math.prod(shape)) <= 1


def test_outlier_ratio_is_over_the_block_s_scores_together():
    low = torch.ones(10, 10)
    high = torch.full((10, 10), 100.0)
    # the mean of both together is 50.5: `high`'s entries exceed 1.5 × it; alone, none exceeds 1.5 × its mean
    assert outlier_ratio([low, high], 1.5) == 0.5
    assert outlier_ratio([high], 1.5) == 0.0
    assert torch.equal(wanda_score(torch.tensor([[-2.0, 3.0]]), torch.tensor([4.0, 9.0])), torch.tensor([[4.0, 9.0]]))


def test_deterministic():
    blocks = _blocks([0.0, 0.01, 0.02, 0.005], seed=3)
    assert owl_profile(blocks, 0.6, 0.1, 7) == owl_profile(_blocks([0.0, 0.01, 0.02, 0.005], seed=3), 0.6, 0.1, 7)


@pytest.mark.parametrize("scope", ["row", "layer"])
def test_layer_mask_prunes_exactly_the_count(scope):
    score = torch.rand(37, 53, generator=torch.Generator().manual_seed(0))
    for pruned in (0, 1, 980, 981, 37 * 53):
        keep = layer_mask(score, pruned, scope)
        assert int((~keep).sum()) == pruned
    counts = row_counts(981, 37, 53)
    assert int(counts.sum()) == 981 and int(counts.max() - counts.min()) <= 1
    keep = layer_mask(score, 981, scope)
    if scope == "row":
        assert torch.equal((~keep).sum(1), counts)
        assert bool((score.masked_fill(keep, -1).max(1).values <= score.masked_fill(~keep, 2).min(1).values).all())
    else:
        assert bool((score[keep] >= score[~keep].max()).all())


def test_n_m_and_bad_options_are_input_errors():
    with pytest.raises(InputError, match="2:4 keeps its per-layer pattern"):
        check_structure(Structure(0.5, (2, 4)))
    check_structure(Structure(0.5))
    with pytest.raises(InputError, match="lam 0.3"):
        owl_profile(_blocks([0.0, 0.01]), 0.8, lam=0.3)
    with pytest.raises(InputError, match="m -1"):
        owl_profile(_blocks([0.0, 0.01]), 0.5, m=-1)


def test_layer_mean_ratios_ignore_each_layer_s_energy_scale():
    blocks = _blocks([0.0, 0.01, 0.02], seed=5)
    rescaled = {block: {name: (weight, energy * (1 + 9 * index)) for index, (name, (weight, energy))
                        in enumerate(layers.items())} for block, layers in blocks.items()}
    assert owl_profile(blocks, 0.5, layer_mean=True) == owl_profile(rescaled, 0.5, layer_mean=True)
    assert owl_profile(blocks, 0.5).ratios != owl_profile(rescaled, 0.5).ratios  # the paper's block mean is not
