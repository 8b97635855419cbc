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
