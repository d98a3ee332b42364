"""The output-aware permutation search: channel swaps that lower a linear's true output error.

``d = W - W * mask`` is what pruning removes; over calibration tokens with Gram matrix ``H = X^T X``
the squared output change is ``sum_r d_r H d_r^T``. Starting from RIA's permutation, batched exact
swaps lower it (with ``drift = (X_dense - X)^T X``, the error against the dense model's outputs).
"""
from __future__ import annotations

import torch

from ..sparsity.masks import nm_mask, permuted_nm_mask
from .metrics import TOL, blocked_gram, error_and_grad, grouped
from .swaps import disjoint, swap_positions, swap_sums


def swap_orders(m: int) -> torch.Tensor:
    """``(m*m, 2m)``: the two groups' members ``[a_0..a_m-1, b_0..b_m-1]`` after swapping ``a_i, b_j``
    (entry ``i*m + j``); a transposition, so it is its own inverse."""
    orders = torch.arange(2 * m).repeat(m * m, 1)
    i, j = torch.arange(m).repeat_interleave(m), torch.arange(m).repeat(m) + m
    rows = torch.arange(m * m)
    orders[rows, i], orders[rows, j] = j, i
    return orders


class OutputError:
    """The layer's output error under permutation ``p``, kept up to date through swaps.

    Keeps the mask and ``G = d H`` (``d`` the pruned-away part of ``W``). A swap between groups ``a``
    and ``b`` changes ``d`` only on their ``2m`` channels, by ``Δ = W * (old_mask - new_mask)``, so the
    error changes by ``2 <Δ, G> + Δ H Δ^T`` with ``H`` restricted to those channels. Float64 so that
    thousands of incremental updates do not drift. ``drift`` adds the linear term that makes the error
    the one against the dense model's outputs (:class:`permsparse.sparsity.statistics.InputStats`); it only
    shifts ``G``, so the swap arithmetic is unchanged.
    """

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor, scores: torch.Tensor,
                 p: torch.Tensor, n: int, m: int, drift: torch.Tensor | None = None):
        self.w, self.s, self.n, self.m = weight.double(), scores.double(), n, m
        self.h = blocked_gram(gram, weight.shape[0])
        self.p = p.clone()
        self.mask = permuted_nm_mask(self.s, self.p, n, m)
        d = self.w * ~self.mask
        self.error, self.g = error_and_grad(d, self.h)
        self.scale = self.error  # the start's sum_r d_r H d_r^T, a positive yardstick for the objective
        if drift is not None:  # error against the dense outputs: + 2 <W drift, d>, a constant shift of G
            shift = torch.bmm(self.w.reshape(self.h.shape[0], -1, self.w.shape[1]),
                              blocked_gram(drift, weight.shape[0]))
            self.error += 2 * float((shift * d.reshape(shift.shape)).sum())
            self.g += shift
        self.kept = float((self.s * self.mask).sum())
        diag = self.h.diagonal(dim1=1, dim2=2).repeat_interleave(weight.shape[0] // self.h.shape[0], 0)
        self.w2h = self.w.square() * diag  # error of pruning one weight alone, W_rc^2 H_cc
        self.orders = swap_orders(m).to(self.w.device)

    def _cols(self, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``x[:, cols]`` (``x``: ``(rows, in)``, ``cols``: ``(pairs, 2m)``) as
        ``(pairs, k, 1, rows/k, 2m)``: row blocks apart, one slot for the swaps."""
        pairs, width = cols.shape
        return x[:, cols].double().permute(1, 0, 2).reshape(pairs, self.h.shape[0], 1, -1, width)

    def swap_changes(self, ga: torch.Tensor, gb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact change of error and of retained score, ``(pairs, m*m)`` each, for every swap of
        member ``i`` of group ``ga[q]`` with member ``j`` of ``gb[q]`` (entry ``[q, i*m + j]``)."""
        grid = self.p.view(-1, self.m)
        cols = torch.cat([grid[ga], grid[gb]], dim=1)  # (pairs, 2m) original channels, position order
        pairs, k, width, swaps = cols.shape[0], self.h.shape[0], cols.shape[1], self.orders.shape[0]
        s = self._cols(self.s, cols)
        order = self.orders.view(1, 1, swaps, 1, width).expand(pairs, k, swaps, s.shape[3], width)
        swapped = torch.gather(s.expand(order.shape), -1, order)  # each swap's new position order
        new = torch.gather(nm_mask(swapped, self.n, self.m), -1, order)  # back to member order (involution)
        lost = self._cols(self.mask, cols) - new.double()  # old mask - new mask
        delta = self._cols(self.w, cols) * lost
        h = self.h[:, cols.unsqueeze(-1), cols.unsqueeze(-2)].transpose(0, 1)  # (pairs, k, 2m, 2m)
        flat = delta.reshape(pairs * k, -1, width)
        quad = torch.bmm(flat, h.reshape(pairs * k, width, width)) * flat
        quad = quad.reshape(pairs, k, swaps, -1).sum((1, 3))
        lin = (delta * self._cols(self.g.reshape(self.w.shape[0], -1), cols)).sum((1, 3, 4))
        return 2 * lin + quad, -(s * lost).sum((1, 3, 4))

    def screen(self, ga: torch.Tensor, gb: torch.Tensor, kept_weight: float = 0.0) -> torch.Tensor:
        """Change of ``error - kept_weight * retained`` for every swap (as :meth:`swap_changes`),
        cheaply, ignoring ``H``'s off-diagonal inside the ``2m`` channels. With ``U = old - new`` the
        error change is then ``sum U (2 W G) + |U| W^2 diag(H)``, linear in the new mask like the
        retained score, so it is a ``coef`` sum over kept entries that :func:`swap_sums` gives
        without building a mask. Float32: it only ranks candidates."""
        old = self.mask.double()
        wg2 = 2 * self.w * self.g.reshape(self.w.shape[0], -1)
        coef = (1 - 2 * old) * self.w2h - wg2 - kept_weight * self.s
        base = old * (wg2 + self.w2h + kept_weight * self.s)
        s, coef, base = (grouped(x.float(), self.p, self.m) for x in (self.s, coef, base))
        return (base[ga] + base[gb]).sum((1, 2)).unsqueeze(1) + swap_sums(s, coef, ga, gb, self.n)

    def apply(self, ga: int, gb: int, swap: int, d_error: float, d_kept: float) -> None:
        """Swap member ``swap // m`` of group ``ga`` with member ``swap % m`` of group ``gb``, whose
        changes :meth:`swap_changes` gave, and update mask and ``G`` to match."""
        pos = torch.tensor([ga * self.m + swap // self.m, gb * self.m + swap % self.m], device=self.p.device)
        swap_positions(self.p, pos[:1], pos[1:])
        grid = self.p.view(-1, self.m)
        touched = torch.cat([grid[ga], grid[gb]])
        new = nm_mask(self.s[:, touched], self.n, self.m)
        delta = self.w[:, touched] * (self.mask[:, touched].double() - new.double())
        self.mask[:, touched] = new
        self.g += torch.bmm(delta.reshape(self.h.shape[0], -1, touched.numel()), self.h[:, touched, :])
        self.error += d_error
        self.kept += d_kept


def output(scores: torch.Tensor, n: int, m: int, gen: torch.Generator, start: torch.Tensor,
           chunk_groups: int, weight: torch.Tensor, gram: torch.Tensor, drift: torch.Tensor | None, *,
           rounds: int = 10, pairs: int = 1024, checks: int = 128, proxy_weight: float | None = None) -> torch.Tensor:
    """Swap search on the true output error, from ``start`` (the ``ria`` permutation).

    The objective is ``error/scale - proxy_weight * kept/kept_0``: the output error (against the
    dense model's outputs when ``drift`` is given) over the start's own ``sum_r d_r H d_r^T``, so the
    two terms are comparable, minus the retained host score over the start's. ``proxy_weight``
    defaults to 0 with ``drift`` and 1 without: a linear's error on the pruned model's inputs against
    its own dense weights is the wrong target, and the retained score pulls the search back towards
    what the host keeps (docs/results.md, "Permutation searches", has the measurements).

    Each round draws ``pairs`` random group pairs (inside one chunk of ``chunk_groups`` groups) and
    screens all their ``m*m`` swaps at once (:meth:`OutputError.screen`). Then, best screened first
    and on disjoint groups, at most ``checks`` pairs are evaluated exactly against the current ``G``
    (swaps couple through ``H``, so gains do not simply add) and their best swap is made if it lowers
    the objective. Every move lowers the objective, so the result is never worse than the start.
    """
    state = OutputError(weight, gram, scores, start, n, m, drift)
    if state.scale <= 0 or chunk_groups < 2:
        return start
    if proxy_weight is None:
        proxy_weight = 0.0 if drift is not None else 1.0
    kept_weight = proxy_weight * state.scale / state.kept if state.kept > 0 else 0.0  # in error units
    tol, groups = TOL * state.scale, start.numel() // m
    for _ in range(rounds):
        ga = torch.randint(groups, (pairs,), generator=gen)
        first = ga - ga % chunk_groups
        step = 1 + torch.randint(chunk_groups - 1, (pairs,), generator=gen)  # another group, same chunk
        gb = (first + (ga - first + step) % chunk_groups).to(start.device)
        ga = ga.to(start.device)
        gain = -state.screen(ga, gb, kept_weight).min(1).values
        for q in disjoint(gain, ga, gb, tol)[:checks]:
            a, b = ga[q : q + 1], gb[q : q + 1]
            d_error, d_kept = state.swap_changes(a, b)
            objective = d_error[0] - kept_weight * d_kept[0]
            i = int(objective.argmin())
            if objective[i] < -tol:
                state.apply(int(a), int(b), i, float(d_error[0, i]), float(d_kept[0, i]))
    return state.p
