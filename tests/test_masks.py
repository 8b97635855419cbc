import pytest
import torch

from copal.masks import Structure, check_fits, pack, select_mask, unpack
from copal.errors import InputError


def test_unstructured_row_prunes_exactly_per_row():
    score = torch.rand(16, 40, generator=torch.Generator().manual_seed(0))
    keep = select_mask(score, Structure(0.5))
    assert (keep.sum(1) == 20).all()
    # the kept ones are the highest of each row
    for row in range(16):
        assert score[row][keep[row]].min() >= score[row][~keep[row]].max()


def test_layer_scope_prunes_exactly_per_layer():
    score = torch.rand(16, 40, generator=torch.Generator().manual_seed(1))
    keep = select_mask(score, Structure(0.7, scope="layer"))
    assert int((~keep).sum()) == round(0.7 * 16 * 40)
    assert score[keep].min() >= score[~keep].max()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_n_m_pattern(n, m):
    score = torch.rand(8, 32, generator=torch.Generator().manual_seed(2))
    keep = select_mask(score, Structure(1 - n / m, (n, m)))
    assert (keep.reshape(8, -1, m).sum(-1) == n).all()


def test_forced_positions_are_pruned():
    score = torch.rand(4, 8, generator=torch.Generator().manual_seed(3))
    forced = torch.zeros(4, 8, dtype=torch.bool)
    forced[:, 0] = True
    score[:, 0] = 100.0  # would be kept on merit
    keep = select_mask(score, Structure(0.5), forced)
    assert not keep[:, 0].any()


def test_pack_roundtrip_is_eight_weights_per_byte():
    mask = torch.rand(13, 24) > 0.5
    packed = pack(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (13 * 24 + 7) // 8
    assert torch.equal(unpack(packed, (13, 24)), mask)


def test_n_m_needs_divisible_inputs():
    with pytest.raises(InputError, match="groups of 8"):
        check_fits(Structure(0.5, (4, 8)), "layer.x", (4, 12))


def _stable_sort_reference(score: torch.Tensor, count: int) -> torch.Tensor:
    """What a full stable sort drops: the selection rule before it became kthvalue."""
    order = torch.argsort(score, dim=-1, stable=True)
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.scatter_(-1, order[..., :count], False)
    return keep


@pytest.mark.parametrize("levels", [None, 4, 16])
def test_drop_lowest_equals_a_stable_sort_with_ties_and_forced_positions(levels):
    from copal.masks import drop_lowest

    g = torch.Generator().manual_seed(3)
    score = torch.randn(64, 96, generator=g).abs()
    if levels:  # a 4-bit-like grid: many exact ties, as in weights un-quantised from GGUF
        score = (score * levels).round() / levels
    score[torch.rand(64, 96, generator=g) < 0.1] = float("-inf")  # sequential's forced prunes
    for count in (0, 1, 17, 48, 95, 96):
        assert torch.equal(drop_lowest(score, count), _stable_sort_reference(score, count)), count
    for width in (2, 3, 4, 8):  # N:M groups; up to 4 wide they take the pairwise path
        grouped = score.reshape(64, -1, width)
        for count in range(1, width):
            assert torch.equal(drop_lowest(grouped, count), _stable_sort_reference(grouped, count)), (width, count)
            assert torch.equal(drop_lowest(grouped[:, 0], count), _stable_sort_reference(grouped[:, 0], count))
