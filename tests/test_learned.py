"""The learned permutation's maths and trainer: solvers, cost tiles, the relaxed weight, the loop."""
from __future__ import annotations

import itertools

import pytest
import torch

from permsparse.config import Learned
from permsparse.sparsity.masks import nm_mask
from permsparse.permute.sinkhorn import (CostTiles, hungarian, log_sinkhorn, perm_matrix, relaxed_weight,
                                        sinkhorn_matrices, standardise)
from permsparse.permute.trainer import LearnLinear, LearnSite, learn_permutations


def gather_formula(weight: torch.Tensor, scores: torch.Tensor, p: torch.Tensor, n: int, m: int):
    """The definition: ``W * unpermute(nm_mask(S[:, p]))`` with ``unpermute(mask)[:, p] = mask``."""
    mask = nm_mask(scores[:, p], n, m)
    back = torch.zeros_like(mask)
    back[:, p] = mask
    return weight * back


def is_tiled_perm(p: torch.Tensor, tile: int) -> bool:
    """``p`` is a permutation that keeps every channel inside its tile."""
    width = p.numel()
    offsets = torch.arange(0, width, tile).unsqueeze(1)
    tiles = p.reshape(-1, tile)
    return torch.equal(p.sort().values, torch.arange(width)) and bool(((tiles >= offsets) & (tiles < offsets + tile)).all())


def clustered_layer(seed: int, width: int = 32, out: int = 16, tokens: int = 64):
    """A layer whose salient inputs all sit in the first half: the identity prunes half of them.

    Columns ``width/2..`` are exactly zero, so any permutation placing two salient channels in each
    group of four keeps every non-zero weight: the optimum output error is 0.
    """
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, width, generator=g)
    weight[:, width // 2:] = 0.0
    x = torch.randn(tokens, width, generator=g)
    scores = weight.abs() * x.norm(dim=0)
    target = x @ weight.T

    def loss(weights: dict[str, torch.Tensor], step: int = 0) -> torch.Tensor:
        return ((x @ weights["lin"].T - target) ** 2).mean()

    return weight, scores, loss


def site(name, linears: dict, tile: int, base=None, warm=True, tie=None) -> LearnSite:
    width = next(iter(linears.values()))[0].shape[1]
    base = torch.arange(width) if base is None else base
    return LearnSite(name, base, tile, {k: LearnLinear(w, lambda s=s: s) for k, (w, s) in linears.items()}, tie, warm)


def test_log_sinkhorn_is_doubly_stochastic():
    log_alpha = torch.randn(3, 7, 7, generator=torch.Generator().manual_seed(0)) * 3
    P = log_sinkhorn(log_alpha, iters=100).exp()
    assert (P >= 0).all()
    torch.testing.assert_close(P.sum(-1), torch.ones(3, 7), atol=1e-4, rtol=0)
    torch.testing.assert_close(P.sum(-2), torch.ones(3, 7), atol=1e-5, rtol=0)


def autograd_sinkhorn(log_alpha, iters):
    """The reference: log-domain Sinkhorn with autograd through every iterate."""
    x = log_alpha
    for _ in range(iters):
        x = x - torch.logsumexp(x, dim=-1, keepdim=True)
        x = x - torch.logsumexp(x, dim=-2, keepdim=True)
    return x


@pytest.mark.parametrize("eps", [0.5, 0.05])
def test_soft_permutation_gradient_equals_autograd_through_every_iterate(eps):
    gen = torch.Generator().manual_seed(3)
    cost = torch.randn(6, 8, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(6, 8, 8, generator=gen, dtype=torch.float64)
    lean = (sinkhorn_matrices(cost, eps, 20) * weights).sum()
    stored = (autograd_sinkhorn(-standardise(cost) / eps, 20).exp() * weights).sum()
    assert torch.equal(lean, stored)  # the lean forward does the same arithmetic, in place
    (lean_grad,), (stored_grad,) = torch.autograd.grad(lean, cost), torch.autograd.grad(stored, cost)
    torch.testing.assert_close(lean_grad, stored_grad, rtol=1e-9, atol=1e-12)


def test_sinkhorn_approaches_hungarian_as_eps_falls():
    cost = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(1))
    target = perm_matrix(hungarian(cost))
    gaps = [(log_sinkhorn(-cost / eps, iters=500).exp() - target).abs().max().item() for eps in (1.0, 0.3, 0.1, 0.03, 0.01)]
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < 0.01, gaps


def test_hungarian_matches_brute_force():
    cost = torch.randn(5, 5, 5, generator=torch.Generator().manual_seed(2))
    perms = hungarian(cost)
    assert perms.dtype == torch.long and perms.shape == (5, 5)
    cols = torch.arange(5)
    for block, p in zip(cost, perms):
        assert sorted(p.tolist()) == list(range(5))
        brute = min(block[list(q), cols].sum().item() for q in itertools.permutations(range(5)))
        assert block[p, cols].sum().item() == pytest.approx(brute, abs=1e-5)


def test_perm_matrix_convention():
    p = torch.tensor([[2, 0, 3, 1]])
    x = torch.randn(3, 4)
    torch.testing.assert_close(x @ perm_matrix(p)[0], x[:, p[0]])


@pytest.mark.parametrize("width,tile,tie", [(16, 16, None), (64, 16, None), (48, 8, [0, 1, 2, 0, 1, 2])])
def test_warm_start_is_the_identity_and_sharp(width, tile, tie):
    tiles = CostTiles(width, tile, 4, tie=tie, warm=True, eps_start=0.3, warm_sharpness=0.9)
    assert torch.equal(tiles.hard(), torch.arange(width))
    soft = tiles.soft(0.3, iters=50)
    mass = soft.diagonal(dim1=-2, dim2=-1).mean(-1)
    assert ((mass > 0.8) & (mass < 0.97)).all(), mass


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="multiple of the tile"):
        CostTiles(16, 6, 4)
    with pytest.raises(ValueError, match="multiple of M"):
        CostTiles(12, 6, 4)
    with pytest.raises(ValueError, match="tie"):
        CostTiles(16, 8, 4, tie=[0, 2])


def test_tied_tiles_share_one_permutation():
    tiles = CostTiles(64, 16, 4, tie=[0, 1, 0, 1], warm=False, seed=9)
    p = tiles.hard()
    assert is_tiled_perm(p, 16)
    local = p.reshape(4, 16) - torch.arange(0, 64, 16).unsqueeze(1)
    assert torch.equal(local[0], local[2]) and torch.equal(local[1], local[3]) and not torch.equal(local[0], local[1])


@pytest.mark.parametrize("forward", ["hard", "soft"])
def test_relaxed_weight_is_exact_at_the_hard_permutation_with_a_correct_gradient(forward):
    """At a one-hot P the relaxed weight is the gather formula bit for bit; its custom backward equals
    autograd through the plain einsum formula; every cost tile gets a gradient."""
    g = torch.Generator().manual_seed(4)
    weight, scores = torch.randn(6, 32, generator=g), torch.rand(6, 32, generator=g)
    base = torch.randperm(32, generator=g)
    tiles = CostTiles(32, 8, 4, warm=False, seed=5)
    local = tiles.hard_local()
    p = base[tiles.hard(local)]
    mask = nm_mask(scores[:, p], 2, 4)
    if forward == "hard":
        value = relaxed_weight(weight, mask, perm_matrix(local)[tiles.tie], base)
        assert torch.equal(value, gather_formula(weight, scores, p, 2, 4))
    mats = tiles.matrices(0.5, 20, forward, local)
    out = relaxed_weight(weight, mask, mats, base)
    probe = torch.randn(out.shape, generator=g)
    (grad,) = torch.autograd.grad((out * probe).sum(), tiles.cost)
    mats = tiles.matrices(0.5, 20, forward, local)
    keep = torch.einsum("ogj,gij->ogi", mask.view(6, 4, 8).float(), mats).reshape(6, 32)
    plain = torch.empty_like(weight)
    plain = plain.index_put((torch.arange(6)[:, None], base[None, :]), weight[:, base] * keep)
    (expected,) = torch.autograd.grad((plain * probe).sum(), tiles.cost)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6)
    assert (grad.flatten(1).abs().sum(1) > 0).all()
    if forward == "hard":  # the gathered forward pass: the same value and the same gradient, bit for bit
        mats = tiles.matrices(0.5, 20, forward, local)
        fast = relaxed_weight(weight, mask, mats, base, hard=local[tiles.tie])
        assert torch.equal(fast, out)
        assert torch.equal(torch.autograd.grad((fast * probe).sum(), tiles.cost)[0], grad)


def test_soft_weight_converges_to_hard_as_the_permutation_sharpens():
    g = torch.Generator().manual_seed(6)
    weight, scores = torch.randn(5, 32, generator=g), torch.rand(5, 32, generator=g)
    tiles = CostTiles(32, 16, 4, warm=True, eps_start=0.5)
    p = tiles.hard()
    mask = nm_mask(scores[:, p], 2, 4)
    hard = gather_formula(weight, scores, p, 2, 4)
    errors = [(relaxed_weight(weight, mask, tiles.matrices(eps, 50, "soft", tiles.hard_local()), p) - hard).abs().max().item()
              for eps in (0.5, 0.1, 0.02)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-5, errors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_training_finds_the_known_optimum_from_random_costs(seed):
    weight, scores, loss = clustered_layer(seed)
    identity = loss({"lin": gather_formula(weight, scores, torch.arange(32), 2, 4)}).item()
    perms, record = learn_permutations([site("s", {"lin": (weight, scores)}, 32, warm=False)], loss,
                                       lambda w: loss(w).item(), 2, 4, Learned(steps=60, judge_every=1),
                                       seed=seed, progress=False)
    found = loss({"lin": gather_formula(weight, scores, perms["s"], 2, 4)}).item()
    assert identity > 1.0 and record.init_judged > 0.1  # neither start is already optimal
    assert found == pytest.approx(record.best_judged) and found < 1e-6 * identity
    assert is_tiled_perm(perms["s"], 32)


def test_never_worse_than_the_warm_start_when_training_and_judge_disagree():
    """Training moves the permutation; a judge for which the warm start is optimal must keep it: the
    judge is the distance to the warm start's own effective weight, zero only there."""
    weight, scores, error = clustered_layer(1)
    base = torch.randperm(32, generator=torch.Generator().manual_seed(12))
    start = gather_formula(weight, scores, base, 2, 4)
    perms, record = learn_permutations([site("s", {"lin": (weight, scores)}, 32, base=base)], error,
                                       lambda w: ((w["lin"] - start) ** 2).sum().item(), 2, 4,
                                       Learned(steps=30, lr=0.2, judge_every=3), progress=False)
    assert max(v for _, v in record.judged) > 0  # training did leave the warm start ...
    assert torch.equal(gather_formula(weight, scores, perms["s"], 2, 4), start)  # ... and it came back
    assert record.best_step == 0 and record.best_judged == record.init_judged == 0.0
    assert len(record.loss) == 30 and record.seconds > 0


def test_several_sites_with_ties_are_judged_on_exact_hard_weights():
    g = torch.Generator().manual_seed(10)
    x, x2 = torch.randn(64, 24, generator=g), torch.randn(64, 16, generator=g)
    dense = {"q": torch.randn(8, 24, generator=g), "k": torch.randn(8, 24, generator=g),
             "down": torch.randn(8, 16, generator=g)}
    linears = {k: (w, w.abs()) for k, w in dense.items()}
    seen: list[set[str]] = []

    def error(weights: dict[str, torch.Tensor], step: int = 0) -> torch.Tensor:
        seen.append(set(weights))
        err = sum(((x @ (weights[k] - dense[k]).T) ** 2).mean() for k in ("q", "k"))
        return err + ((x2 @ (weights["down"] - dense["down"]).T) ** 2).mean()

    base_qk = torch.cat([torch.randperm(12, generator=g), torch.randperm(12, generator=g) + 12])
    sites = [site("qk", {"q": linears["q"], "k": linears["k"]}, 12, base=base_qk),
             site("down", {"down": linears["down"]}, 8, tie=[0, 0])]
    perms, record = learn_permutations(sites, error, lambda w: error(w).item(), 2, 4, Learned(steps=20),
                                       progress=False)
    assert all(names == {"q", "k", "down"} for names in seen)
    assert is_tiled_perm(perms["down"], 8) and torch.equal(perms["down"][:8], perms["down"][8:] - 8)
    assert sorted(perms["qk"][:12].tolist()) == sorted(base_qk[:12].tolist())  # stays inside its tile
    hard = {k: gather_formula(w, s, perms["down" if k == "down" else "qk"], 2, 4) for k, (w, s) in linears.items()}
    assert error(hard).item() == pytest.approx(record.best_judged)
    assert record.best_judged == min(v for _, v in record.judged) <= record.init_judged
    assert record.eps[0] == pytest.approx(0.5) and record.eps[-1] == pytest.approx(0.05)


def test_an_interrupted_training_resumes_to_the_same_result():
    weight, scores, loss = clustered_layer(2)
    config = Learned(steps=12, judge_every=2)
    make = lambda: [site("s", {"lin": (weight, scores)}, 32, warm=False)]  # noqa: E731
    judge = lambda w: loss(w).item()  # noqa: E731
    full, record = learn_permutations(make(), loss, judge, 2, 4, config, seed=3, progress=False)
    saved = []
    learn_permutations(make(), loss, judge, 2, 4, config, seed=3, progress=False, save_state=saved.append, save_every=5)
    assert [s["step"] for s in saved] == [5, 10]
    resumed, again = learn_permutations(make(), loss, judge, 2, 4, config, seed=3, progress=False, state=saved[0])
    assert torch.equal(resumed["s"], full["s"]) and again.loss == record.loss and again.judged == record.judged


def test_warm_starts_made_in_one_batch_are_the_identity_and_sharp():
    from permsparse.permute.trainer import warm_starts

    weight = torch.randn(4, 48)
    sites = [site("a", {"a": (weight, weight.abs())}, 16), site("b", {"b": (weight, weight.abs())}, 8, tie=[0, 1, 2, 0, 1, 2]),
             site("c", {"c": (weight[:, :16], weight[:, :16].abs())}, 16)]
    costs = warm_starts(sites, Learned(eps_start=0.3), seed=0)
    assert sorted(costs) == [0, 1, 2] and costs[0].shape == (3, 16, 16) and costs[1].shape == (3, 8, 8)
    for k, s in enumerate(sites):
        tiles = CostTiles(s.base.numel(), s.tile, 4, tie=s.tie, cost=costs[k])
        assert torch.equal(tiles.hard(), torch.arange(s.base.numel()))
        mass = tiles.soft(0.3, iters=50).diagonal(dim1=-2, dim2=-1).mean(-1)
        assert ((mass > 0.8) & (mass < 0.97)).all(), mass
