import pytest
import torch

from permsparse.sparsity.scores import compute_score, magnitude, ria, wanda

W = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
NORM = torch.tensor([2.0, 0.5])


def test_magnitude():
    assert magnitude(W).tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_wanda_hand_case():
    # |W_ij| * ||X_j||: column 0 times 2, column 1 times 0.5
    assert wanda(W, NORM).tolist() == [[2.0, 1.0], [6.0, 2.0]]


def test_ria_hand_case():
    # column sums |W|: [4, 6]; row sums: [3, 7]; ||X||^0.5 = [sqrt 2, sqrt 0.5]
    expected = torch.tensor([
        [(1 / 4 + 1 / 3) * 2**0.5, (2 / 6 + 2 / 3) * 0.5**0.5],
        [(3 / 4 + 3 / 7) * 2**0.5, (4 / 6 + 4 / 7) * 0.5**0.5],
    ])
    torch.testing.assert_close(ria(W, NORM), expected)


def test_compute_score_errors():
    with pytest.raises(ValueError, match="unknown score"):
        compute_score("sparsegpt", W, NORM)
    with pytest.raises(ValueError, match="calibration"):
        compute_score("wanda", W, None)
