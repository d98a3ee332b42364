import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from permsparse.config import parse_pattern
from permsparse.sparsity.masks import as_permutation, is_nm, nm_mask, nm_violation, unstructured_mask


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), groups=st.integers(1, 12), n=st.integers(1, 7), extra=st.integers(1, 5),
       seed=st.integers(0, 2**16), ties=st.booleans())
def test_nm_mask_keeps_exactly_top_n_per_group(rows, groups, n, extra, seed, ties):
    m = n + extra
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, groups * m, generator=g)
    if ties:
        scores = scores.round()
    mask = nm_mask(scores, n, m)
    grouped_mask = mask.reshape(rows, groups, m)
    assert (grouped_mask.sum(-1) == n).all()
    assert is_nm(torch.where(mask, 1.0, 0.0), n, m)
    # every kept score is >= every dropped score in its group
    grouped = scores.reshape(rows, groups, m)
    kept_min = torch.where(grouped_mask, grouped, torch.inf).amin(-1)
    dropped_max = torch.where(grouped_mask, -torch.inf, grouped).amax(-1)
    assert (kept_min >= dropped_max).all()


def test_ties_go_to_the_lower_index():
    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, True, False, False, False, True, True, False]]


def test_nm_mask_hand_case():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.3], [4.0, -1.0, 3.0, 5.0]])
    assert nm_mask(scores, 2, 4).int().tolist() == [[0, 1, 1, 0], [1, 0, 0, 1]]
    assert nm_mask(scores, 1, 4).int().tolist() == [[0, 1, 0, 0], [0, 0, 0, 1]]


def test_patterns_parse_to_nm_or_density():
    assert parse_pattern("2:4") == (2, 4) and parse_pattern("4:8") == (4, 8)
    assert parse_pattern("50%") == pytest.approx(0.5) and parse_pattern("70%") == pytest.approx(0.3)


@pytest.mark.parametrize("bad", ["5:4", "0:4", "4:4", "2-4", "a:b", "2:4:8", "0%", "100%", "x%"])
def test_bad_patterns_are_rejected(bad):
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(bad)


def test_indivisible_width_and_nan_are_rejected():
    with pytest.raises(ValueError, match="divisible"):
        nm_mask(torch.randn(2, 6), 2, 4)
    with pytest.raises(ValueError, match="NaN"):
        nm_mask(torch.tensor([[1.0, float("nan"), 0.0, 1.0]]), 2, 4)


def test_unstructured_mask_keeps_the_row_top_fraction():
    scores = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0, 0.0]])
    assert unstructured_mask(scores, 0.5).int().tolist() == [[1, 0, 1, 0, 1, 0]]


def test_unstructured_keeps_at_least_as_much_score_as_nm():
    scores = torch.rand(16, 64, generator=torch.Generator().manual_seed(0))
    nm = (scores * nm_mask(scores, 2, 4)).sum()
    un = (scores * unstructured_mask(scores, 0.5)).sum()
    assert un >= nm


def test_permuted_mask_is_nm_through_the_permutation_and_identity_is_plain():
    from permsparse.sparsity.masks import permuted_nm_mask

    g = torch.Generator().manual_seed(3)
    scores = torch.rand(6, 16, generator=g)
    perm = torch.randperm(16, generator=g)
    mask = permuted_nm_mask(scores, perm, 2, 4)
    assert torch.equal(mask[:, perm], nm_mask(scores[:, perm], 2, 4))
    assert not is_nm(mask.float(), 2, 4) or torch.equal(perm, torch.arange(16))
    assert torch.equal(permuted_nm_mask(scores, torch.arange(16), 2, 4), nm_mask(scores, 2, 4))


def test_nm_violation_names_the_first_bad_group():
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0, 1.0, 1.0, 1.0, 0.0]])
    assert nm_violation(weight[:, :4], 2, 4) == ""
    assert "1 groups" in nm_violation(weight, 2, 4) and "columns 4..7 holds 3" in nm_violation(weight, 2, 4)
    assert "not divisible" in nm_violation(weight[:, :6], 2, 4)


def test_as_permutation_accepts_permutations_only():
    assert torch.equal(as_permutation([2, 0, 1], 3), torch.tensor([2, 0, 1]))
    for bad in ([0, 0, 1], [0, 1], [1, 2, 3]):
        with pytest.raises(ValueError, match="not a permutation of 3"):
            as_permutation(bad, 3)
