"""Permutation searches: validity, objectives, exactness of the incremental updates, and errors."""
from __future__ import annotations

import pytest
import torch

from permsparse.sparsity.masks import nm_mask, permuted_nm_mask
from permsparse.permute.metrics import efficacy, grouped, output_error, retained
from permsparse.permute.output import OutputError
from permsparse.permute.search import SEARCHES, find_permutation, needs_gram
from permsparse.permute.swaps import leave_member_out, leave_one_out, swap_sums

PATTERNS = [(2, 4), (4, 8), (1, 4)]


def layer(rows: int, cols: int, seed: int = 0, blocks: int = 1, ties: bool = False):
    """Random weight, Wanda-like score and input Gram (one per row block when ``blocks > 1``)."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        w = torch.randint(-3, 4, (rows, cols), generator=g).float()
    else:
        w = torch.randn(rows, cols, generator=g)
    x = torch.randn(blocks, 4 * cols, cols, generator=g) * torch.rand(cols, generator=g) * 3
    gram = x.transpose(1, 2) @ x
    scores = w.abs() * x.square().sum((0, 1)).sqrt()
    return w, (gram[0] if blocks == 1 else gram), scores


def valid(p: torch.Tensor, cols: int) -> bool:
    return p.dtype == torch.long and torch.equal(p.sort().values, torch.arange(cols))


def bound(scores: torch.Tensor, n: int, m: int) -> float:
    return float(scores.double().topk(scores.shape[1] * n // m, dim=1).values.sum())


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("method", list(SEARCHES))
def test_valid_permutation_and_bound(method, n, m):
    w, gram, s = layer(24, 48, seed=n + m)
    p = find_permutation(s, n, m, method, weight=w, gram=gram)
    assert valid(p, 48)
    assert retained(s, p, n, m) <= bound(s, n, m) + 1e-6


@pytest.mark.parametrize("method", list(SEARCHES))
def test_groups_keep_channels_in_chunks(method):
    w, gram, s = layer(16, 64)
    p = find_permutation(s, 2, 4, method, weight=w, gram=gram, chunks=4)
    assert valid(p, 64)
    assert torch.equal(p.view(4, 16) // 16, torch.arange(4).view(4, 1).expand(4, 16))


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("seed", range(3))
def test_each_method_beats_identity_on_its_objective(n, m, seed):
    w, gram, s = layer(32, 64, seed=seed)
    ident = torch.arange(64)
    for method in ("cp", "ria"):
        assert retained(s, find_permutation(s, n, m, method, seed=seed), n, m) >= retained(s, ident, n, m)
    ria = find_permutation(s, n, m, "ria")
    out = find_permutation(s, n, m, "output", weight=w, gram=gram, seed=seed)
    assert output_error(w, gram, out, n, m, s) <= output_error(w, gram, ria, n, m, s) + 1e-9
    assert output_error(w, gram, out, n, m, s) < output_error(w, gram, ident, n, m, s)


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("method", ["cp", "ria"])
def test_known_optimum_is_found(method, n, m):
    """Salient channels clustered by the identity: a permutation spreading them reaches the bound."""
    g = torch.Generator().manual_seed(1)
    groups, rows = 8, 16
    strong = torch.zeros(groups * m, dtype=torch.bool)
    strong[: groups * n] = True  # n strong channels per group once spread, all in the first groups now
    noise = torch.rand(rows, groups * m, generator=g)
    s = noise + 10 * strong * torch.rand(rows, groups * m, generator=g).add(1)
    assert efficacy(s, torch.arange(groups * m), n, m) == 0.0
    assert efficacy(s, find_permutation(s, n, m, method), n, m) > 0.999


def test_efficacy_is_one_at_bound():
    s = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.5, 0.1]])
    assert efficacy(s, torch.tensor([0, 2, 4, 6, 1, 3, 5, 7]), 2, 4) == pytest.approx(1.0)
    assert efficacy(s, torch.arange(8), 2, 4) == 0.0


@pytest.mark.parametrize("method", ["cp", "ria", "output"])
def test_deterministic(method):
    w, gram, s = layer(24, 64, seed=3)
    runs = [find_permutation(s, 2, 4, method, weight=w, gram=gram, seed=7) for _ in range(2)]
    assert torch.equal(*runs)


@pytest.mark.parametrize("blocks", [1, 3])
@pytest.mark.parametrize("ties", [False, True])
def test_incremental_error_equals_recomputation(blocks, ties):
    """Predicted changes of swaps equal full recomputation, and so does the state after many swaps."""
    w, gram, s = layer(12 * blocks, 32, seed=5, blocks=blocks, ties=ties)
    state = OutputError(w, gram, s, torch.randperm(32, generator=torch.Generator().manual_seed(0)), 2, 4)
    g = torch.Generator().manual_seed(1)
    for _ in range(25):
        a = torch.randint(8, (1,), generator=g)
        b = (a + 1 + torch.randint(7, (1,), generator=g)) % 8
        d_error, d_kept = state.swap_changes(a, b)
        i = int(torch.randint(16, (1,), generator=g))
        before = state.error
        state.apply(int(a), int(b), i, float(d_error[0, i]), float(d_kept[0, i]))
        assert state.error - before == pytest.approx(float(d_error[0, i]), rel=1e-9, abs=1e-9)
        assert state.error == pytest.approx(output_error(w, gram, state.p, 2, 4, s), rel=1e-9)
    fresh = OutputError(w, gram, s, state.p, 2, 4)
    assert torch.equal(state.mask, fresh.mask)
    assert torch.allclose(state.g, fresh.g, rtol=1e-9, atol=1e-9)
    assert state.kept == pytest.approx(retained(s, state.p, 2, 4), rel=1e-12)


def test_drift_makes_the_error_the_error_against_dense_outputs():
    """With ``drift = (X_dense - X)^T X`` the tracked objective differs from the true error against the
    dense outputs, ``||X_dense W^T - X (W * mask)^T||^2``, by one constant through any swaps; the
    search lowers that true error below its ria start."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(24, 32, generator=g, dtype=torch.float64)
    x = torch.randn(300, 32, generator=g, dtype=torch.float64)
    x_dense = x + 0.3 * torch.randn(300, 32, generator=g, dtype=torch.float64)
    gram, drift, s = x.T @ x, (x_dense - x).T @ x, w.abs() * x.norm(dim=0)

    def true_error(p):
        return float((x_dense @ w.T - x @ (w * permuted_nm_mask(s, p, 2, 4)).T).square().sum())

    state = OutputError(w, gram, s, torch.arange(32), 2, 4, drift)
    constant = true_error(state.p) - state.error
    for _ in range(20):
        a = torch.randint(8, (1,), generator=g)
        b = (a + 1 + torch.randint(7, (1,), generator=g)) % 8
        d_error, d_kept = state.swap_changes(a, b)
        i = int(torch.randint(16, (1,), generator=g))
        state.apply(int(a), int(b), i, float(d_error[0, i]), float(d_kept[0, i]))
        assert state.error + constant == pytest.approx(true_error(state.p), rel=1e-9)
    p = find_permutation(s, 2, 4, "output", weight=w, gram=gram, drift=drift, proxy_weight=0.0)
    assert true_error(p) < true_error(find_permutation(s, 2, 4, "ria"))


@pytest.mark.parametrize("n,m", PATTERNS)
@pytest.mark.parametrize("ties", [False, True])
def test_screen_is_exact_for_diagonal_gram(n, m, ties):
    """The cheap screen drops only H's off-diagonal: with a diagonal H it equals the exact change,
    including the N:M tie-break (integer weights tie a lot)."""
    w, gram, s = layer(16, 8 * m, seed=2, ties=ties)
    diag = torch.diag(gram.diagonal())
    state = OutputError(w, diag, s, torch.arange(8 * m), n, m)
    ga, gb = torch.tensor([0, 1, 2, 5]), torch.tensor([3, 7, 4, 6])
    d_error, d_kept = state.swap_changes(ga, gb)
    scale = float(d_error.abs().max())
    assert torch.allclose(state.screen(ga, gb).double(), d_error, atol=1e-5 * scale)
    assert torch.allclose(state.screen(ga, gb, 0.5).double(), d_error - 0.5 * d_kept, atol=1e-5 * scale)


def test_swap_sums_match_masks():
    """The leave-one-out arithmetic gives the retained score of every swap, as nm_mask would."""
    _, _, s = layer(8, 32, seed=4, ties=True)
    p = torch.arange(32)
    ga, gb = torch.tensor([0, 2]), torch.tensor([5, 3])
    got = swap_sums(grouped(s, p, 4), grouped(s, p, 4), ga, gb, 2)
    for q in range(2):
        for k in range(16):
            q_p = p.clone()
            i, j = int(ga[q]) * 4 + k // 4, int(gb[q]) * 4 + k % 4
            q_p[i], q_p[j] = p[j], p[i]
            cols = torch.cat([q_p.view(-1, 4)[ga[q]], q_p.view(-1, 4)[gb[q]]])
            want = (s[:, cols] * nm_mask(s[:, cols], 2, 4)).sum()
            assert float(got[q, k]) == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_leave_member_out_is_leave_one_out_at_that_member(n, m):
    """RIA's one-member form gives the very numbers of the full leave-one-out, ties included."""
    _, _, s = layer(8, 8 * m, seed=5, ties=True)
    grid = grouped(s, torch.arange(8 * m), m).double()
    kept, nth = leave_one_out(grid, grid, n)[:2]
    for j in range(m):
        one_kept, one_nth = leave_member_out(grid, n, j)
        assert torch.equal(one_kept[:, 0], kept[:, j]) and torch.equal(one_nth[:, 0], nth[:, j])


def test_block_gram_equals_sum_of_separate_errors():
    w, gram, s = layer(18, 32, seed=6, blocks=3)
    p = find_permutation(s, 2, 4, "ria")
    block = [slice(6 * i, 6 * (i + 1)) for i in range(3)]
    parts = sum(output_error(w[b], gram[i], p, 2, 4, s[b]) for i, b in enumerate(block))
    assert output_error(w, gram, p, 2, 4, s) == pytest.approx(parts, rel=1e-12)
    out = find_permutation(s, 2, 4, "output", weight=w, gram=gram)
    assert output_error(w, gram, out, 2, 4, s) <= output_error(w, gram, p, 2, 4, s) + 1e-9


def test_proxy_blend_keeps_more_score():
    w, gram, s = layer(32, 64, seed=8)
    plain = find_permutation(s, 2, 4, "output", weight=w, gram=gram)
    blended = find_permutation(s, 2, 4, "output", weight=w, gram=gram, proxy_weight=5.0)
    assert valid(blended, 64)
    assert retained(s, blended, 2, 4) >= retained(s, plain, 2, 4) - 1e-6


def test_identity_and_needs_gram():
    _, _, s = layer(4, 16)
    assert torch.equal(find_permutation(s, 2, 4, "none"), torch.arange(16))
    assert needs_gram("output") and not needs_gram("ria")


def test_bad_input_is_a_clear_error():
    w, gram, s = layer(8, 16)
    with pytest.raises(ValueError, match="not divisible by M"):
        find_permutation(s[:, :14], 2, 4, "ria")
    with pytest.raises(ValueError, match="chunks=3"):
        find_permutation(s, 2, 4, "cp", chunks=3)
    with pytest.raises(ValueError, match="chunks=8"):
        find_permutation(s, 2, 4, "cp", chunks=8)  # chunks of 2 channels are not multiples of 4
    with pytest.raises(ValueError, match="needs both weight and gram"):
        find_permutation(s, 2, 4, "output", weight=w)
    with pytest.raises(ValueError, match="unknown permutation method"):
        find_permutation(s, 2, 4, "magic")
    with pytest.raises(ValueError, match="unknown option"):
        find_permutation(s, 2, 4, "ria", bogus=1)
    with pytest.raises(ValueError, match="invalid"):
        find_permutation(s, 4, 4, "ria")
    with pytest.raises(ValueError, match="gram blocks"):
        find_permutation(s, 2, 4, "output", weight=w, gram=torch.stack([gram] * 3))


@pytest.mark.parametrize("method", ["cp", "ria"])
def test_the_gpus_large_tiles_give_the_cpus_sums_and_permutations(method, monkeypatch):
    """On a GPU :func:`insert_values` sums in tiles of 128M elements instead of 512K; each entry is the same
    sum either way, so the searches choose the same permutations (checked here on the CPU with the GPU's tiles)."""
    from permsparse.permute import swaps

    _, _, s = layer(96, 512, seed=4)
    cand, nth = s.T[:200].contiguous(), s.T[200:330].contiguous()
    small, perm = swaps.insert_values(cand, nth), find_permutation(s, 2, 4, method, seed=1)
    monkeypatch.setitem(swaps.TILE_ELEMENTS, "cpu", swaps.TILE_ELEMENTS["cuda"])
    assert torch.equal(swaps.insert_values(cand, nth), small)
    assert torch.equal(find_permutation(s, 2, 4, method, seed=1), perm)


def reference_ria(scores: torch.Tensor, n: int, m: int, rounds: int = 2) -> torch.Tensor:
    """RIA written out plainly: the snake deal, then for every slot the retained score of every group with
    every slot channel in that slot, counted on the N:M mask of the whole group, and the best assignment."""
    from scipy.optimize import linear_sum_assignment

    s = scores.double()
    cols, groups = s.shape[1], s.shape[1] // m
    order = torch.sort(s.sum(0), descending=True, stable=True).indices.tolist()
    slots = [[0] * m for _ in range(groups)]
    for i, channel in enumerate(order):
        band, k = divmod(i, groups)
        slots[k if band % 2 == 0 else groups - 1 - k][band] = channel
    for _ in range(rounds):
        for j in range(m):
            value = torch.zeros(groups, groups, dtype=torch.float64)
            for c in range(groups):  # the channel now in slot j of group c ...
                for g in range(groups):  # ... placed in group g
                    members = slots[g][:j] + [slots[c][j]] + slots[g][j + 1:]
                    value[c, g] = (s[:, members] * nm_mask(s[:, members], n, m)).sum()
            row, col = linear_sum_assignment(value.numpy(), maximize=True)
            moved = [slots[r][j] for r in row]
            for r, g in zip(row, col):
                slots[g][j] = moved[r]
    return torch.tensor([c for group in slots for c in group])


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8)])
def test_ria_is_the_plain_search(n, m):
    """The batched RIA (leave-one-out bars, summed inserts) chooses what the plain per-group count chooses."""
    _, _, s = layer(24, 16 * m, seed=11 + m)
    p = find_permutation(s, n, m, "ria")
    assert torch.equal(p, reference_ria(s, n, m))
