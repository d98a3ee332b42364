"""Input-channel permutations that make N:M pruning lose less.

A permutation ``p`` reorders the input channels of a layer: the permuted layer is ``W[:, p]`` (position
``j`` holds original channel ``p[j]``) and its N:M mask is chosen on ``scores[:, p]``. Which channels
share a group of M decides which weights survive, so a good ``p`` spreads salient channels over groups.

Methods (method.md sections 1, 2):

- ``none``: the identity, the baseline every other method is measured against.
- ``cp``: Pool & Yu's channel permutation (NVIDIA ASP): greedy swaps of two channels between two groups
  that raise the retained score, with a few random kicks out of local optima.
- ``ria``: RIA's permutation (Zhang et al. 2024): deal channels into groups by column-sum bands, then
  re-assign one slot of every group at a time by a linear assignment.
- ``output`` [ours]: start from ``ria`` and swap channels to lower the layer's true output error
  ``sum_r d_r H d_r^T`` (``d`` the pruned-away part of ``W``, ``H = X^T X``), judged exactly.

Retained score and output error of a swap only depend on the two groups it touches, so every search
here scores many candidate swaps in one batched tensor step instead of a loop over groups.
"""
from __future__ import annotations

import inspect
import time

import torch
from scipy.optimize import linear_sum_assignment

from .masks import nm_mask, parse_pattern, permuted_nm_mask

_TOL = 1e-9  # relative gain below which a move counts as no gain (float noise)


# --------------------------------------------------------------------------------------------- metrics
def _grouped(scores: torch.Tensor, p: torch.Tensor, m: int) -> torch.Tensor:
    """``scores[:, p]`` as ``(groups, m, rows)``: rows innermost, so that the sums over rows that every
    search ends with run over contiguous memory (a size-``m`` inner dimension is several times slower)."""
    return scores.T[p].reshape(-1, m, scores.shape[0])


def _kept(x: torch.Tensor, n: int) -> torch.Tensor:
    """What an N:M mask keeps of each group of ``x`` (``(..., m, rows)``): the sum of the top ``n``."""
    return x.topk(n, dim=-2).values.sum(-2)


def retained(scores: torch.Tensor, p: torch.Tensor, n: int, m: int) -> float:
    """Score kept by the N:M mask of ``scores[:, p]``, ``R(p)`` of method.md section 1."""
    return float(_kept(_grouped(scores.double(), p, m), n).sum())


def efficacy(scores: torch.Tensor, p: torch.Tensor, n: int, m: int) -> float:
    """Share of the identity's gap to the unstructured bound that ``p`` closes (Pool & Yu 2021).

    The bound keeps the top ``in*N/M`` of every row, which no permutation can beat. When the identity
    already reaches it there is nothing to close, and any ``p`` that also reaches it scores 1.
    """
    s = scores.double()
    ident = retained(s, torch.arange(s.shape[1]), n, m)
    bound = float(s.topk(s.shape[1] * n // m, dim=1).values.sum())
    gain = retained(s, p, n, m) - ident
    if bound - ident <= _TOL * max(abs(bound), 1.0):
        return 1.0 if gain >= -_TOL * max(abs(bound), 1.0) else float("-inf")
    return gain / (bound - ident)


def _blocked_gram(gram: torch.Tensor, rows: int) -> torch.Tensor:
    """Gram as ``(k, in, in)``; with ``k > 1`` row block ``i`` of the weight reads ``gram[i]``."""
    g = gram.unsqueeze(0) if gram.dim() == 2 else gram
    if g.dim() != 3 or g.shape[1] != g.shape[2]:
        raise ValueError(f"gram must be (in, in) or (k, in, in), got {tuple(gram.shape)}")
    if rows % g.shape[0]:
        raise ValueError(f"{rows} weight rows do not split into {g.shape[0]} gram blocks")
    return g.double()


def _error_and_grad(d: torch.Tensor, h: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``sum_r d_r H d_r^T`` and ``G = d H`` (block-wise), for a pruned-away part ``d`` of ``(rows, in)``."""
    k = h.shape[0]
    g = torch.bmm(d.reshape(k, -1, d.shape[1]), h)
    return float((g * d.reshape(g.shape)).sum()), g


def output_error(weight: torch.Tensor, gram: torch.Tensor, p: torch.Tensor, n: int, m: int,
                 scores: torch.Tensor) -> float:
    """Output error ``sum_r d_r H d_r^T`` of pruning ``weight`` with the mask of ``scores[:, p]``.

    ``d = W - W * mask`` is what pruning removes, so this is the squared output change summed over the
    calibration tokens whose Gram matrix is ``gram`` (``(in, in)``, or ``(k, in, in)`` per row block).
    """
    d = weight.double() * ~permuted_nm_mask(scores, p, n, m)
    return _error_and_grad(d, _blocked_gram(gram, weight.shape[0]))[0]


# ----------------------------------------------------------------------------------- swap arithmetic
def _leave_one_out(s: torch.Tensor, coef: torch.Tensor, n: int):
    """For each member ``i`` of groups of scores ``s`` (``(..., m, rows)``, position order), as if ``i``
    had left: the sum of ``coef`` over the top-``n`` of the others, and the score, position and ``coef``
    of the ``n``-th of the others (the weakest survivor). All ``(..., m, rows)``.

    A newcomer joins the kept set exactly when it beats that weakest survivor, and then replaces it.
    This turns "the group with one member exchanged" into one comparison, which is what makes the
    batched searches cheap: no mask is ever re-sorted per candidate.
    """
    m = s.shape[-2]
    rank = torch.zeros(s.shape, dtype=torch.uint8)  # members beating each one; ties: lower position
    for k in range(m):  # m comparisons of whole tensors: faster than sorting tiny groups
        rank[..., :k, :] += s[..., k:k + 1, :] > s[..., :k, :]
        rank[..., k + 1:, :] += s[..., k:k + 1, :] >= s[..., k + 1:, :]
    inside = (rank < n).to(s.dtype)  # a kept member leaving lets the (n+1)-th in
    pos = torch.arange(m, dtype=s.dtype).view(-1, 1)
    at = [(rank == r).to(s.dtype) for r in (n - 1, n)]  # one-hot: the n-th and the (n+1)-th
    s_at, c_at, p_at = ([(x * a).sum(-2, keepdim=True) for a in at] for x in (s, coef, pos))
    kept = (coef * inside).sum(-2, keepdim=True) + inside * (c_at[1] - coef)
    pick = lambda x: x[0] + inside * (x[1] - x[0])  # noqa: E731  (exact: picks one of the two)
    return kept, pick(s_at), pick(p_at), pick(c_at)


def _exchange(stats: list[torch.Tensor], new: torch.Tensor, new_coef: torch.Tensor,
              chunk: int = 32) -> torch.Tensor:
    """``[q, i, j]``: sum over rows of ``coef`` over the kept members of a group after its member ``i``
    is replaced by ``new[q, j]`` (which takes position ``i``, the N:M tie-break).

    ``stats`` is :func:`_leave_one_out` of the receiving groups, ``new``/``new_coef`` the incoming
    scores and worths ``(pairs, m, rows)``. The ``(pairs, m, m, rows)`` comparison runs ``chunk``
    pairs at a time, to stay in cache.
    """
    kept, nth, nth_pos, nth_coef = stats
    earlier = torch.arange(new.shape[-2]).view(-1, 1) < nth_pos  # newcomer at i wins ties: lower the
    bar = nth + earlier * (nth.nextafter(torch.tensor(-torch.inf, dtype=nth.dtype)) - nth)  # bar 1 ulp
    s, c = new.unsqueeze(-3), new_coef.unsqueeze(-3)
    bar, nth_coef = bar.unsqueeze(-2), nth_coef.unsqueeze(-2)
    out = kept.sum(-1).unsqueeze(-1).repeat(1, 1, new.shape[-2])
    for q in range(0, new.shape[0], chunk):
        part = slice(q, q + chunk)
        out[part] += ((s[part] > bar[part]) * (c[part] - nth_coef[part])).sum(-1)
    return out


def _swap_sums(s: torch.Tensor, coef: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor,
               n: int) -> torch.Tensor:
    """``(pairs, m*m)``: sum of ``coef`` over the kept entries of groups ``ga[q]`` and ``gb[q]`` after
    swapping their members ``i`` and ``j`` (entry ``i*m + j``). ``s``, ``coef``: ``(groups, m, rows)``.

    With ``coef = s`` this is the retained score of the two groups; only they change, so it is exact.
    """
    stats = _leave_one_out(s, coef, n)  # once per group, however many pairs use it
    into_a = _exchange([x[ga] for x in stats], s[gb], coef[gb])
    into_b = _exchange([x[gb] for x in stats], s[ga], coef[ga])
    return (into_a + into_b.transpose(-1, -2)).flatten(1)


def _disjoint(gain: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, tol: float) -> list[int]:
    """Indices of pairs with ``gain > tol``, best first, skipping pairs that touch a group already
    taken: moves on disjoint groups can all be made in one round."""
    order = torch.argsort(gain, descending=True, stable=True)
    order = order[gain[order] > tol]
    used: set[int] = set()
    picked = []
    for q, a, b in zip(order.tolist(), ga[order].tolist(), gb[order].tolist()):
        if a not in used and b not in used:
            used.update((a, b))
            picked.append(q)
    return picked


def _swap_positions(p: torch.Tensor, pos_a: torch.Tensor, pos_b: torch.Tensor) -> None:
    """Swap the channels at positions ``pos_a[q]`` and ``pos_b[q]`` (all disjoint), in place."""
    p[pos_a], p[pos_b] = p[pos_b].clone(), p[pos_a].clone()


def _insert_values(cand: torch.Tensor, nth: torch.Tensor) -> torch.Tensor:
    """``out[c, g] = sum_r relu(cand[c, r] - nth[g, r])``: what channel ``c`` adds to a group whose
    weakest survivor is ``nth[g]`` (see :func:`_leave_one_out`).

    This is the hot loop of ``cp`` and ``ria``. It runs as ``sum_r max(cand, nth) - sum_r nth`` (two
    passes over the broadcast instead of three) in square tiles of about 2M elements, which stay in
    cache: 2-3x faster than one pass per candidate row at SmolLM2 widths. The float32 cancellation
    error (about ``rows * 1e-7`` of a score) is far below the gains the searches act on.
    """
    tile = max(8, int((2**21 / cand.shape[1]) ** 0.5))
    out = torch.empty(cand.shape[0], nth.shape[0], dtype=cand.dtype)
    for g in range(0, nth.shape[0], tile):
        block = nth[None, g:g + tile]
        for i in range(0, cand.shape[0], tile):
            torch.sum(torch.maximum(cand[i:i + tile, None, :], block), -1, out=out[i:i + tile, g:g + tile])
    return out - nth.sum(-1)


def _replacement_gains(st: torch.Tensor, p: torch.Tensor, groups: torch.Tensor, n: int,
                       m: int) -> torch.Tensor:
    """``out[j, c]``: retained-score change of the group at position ``j`` (for all positions of
    ``groups``) if channel ``c`` took the place of its channel. ``st`` is ``scores.T`` (``(in, rows)``).

    Only the row's own group enters, so a swap of positions ``j, l`` gains exactly
    ``out[j, p[l]] + out[l, p[j]]``, and after a swap only the rows of the two groups change.
    """
    grid = st[p].view(-1, m, st.shape[1])[groups]
    kept, nth = _leave_one_out(grid, grid, n)[:2]
    loss = (kept.sum(-1) - _kept(grid, n).sum(-1, keepdim=True)).reshape(-1, 1)
    return _insert_values(st, nth.reshape(-1, st.shape[1])).T + loss


def _cp(scores: torch.Tensor, n: int, m: int, gen: torch.Generator, *, rounds: int = 12,
        perturbations: int = 2, kick: float = 0.05, candidates: int = 16) -> torch.Tensor:
    """Pool & Yu channel swaps. Keeps the exact gain of every swap of two channels in different
    groups (see :func:`_replacement_gains`); each round takes every position's ``candidates`` best
    partners, makes the best improving swaps among them on disjoint groups (their gains add) and
    refreshes the rows of the groups that changed. (Per-position candidates rather than a global top
    list spread a round over many groups: a global list crowds onto a few hub groups, so a round made
    13 swaps in the first round on SmolLM2's block-14 down_proj, 1536 wide, where per-position
    candidates make 107. Too few per position stall instead: on a random 1024-wide matrix 12 rounds
    reach efficacy 0.66 with 4, 0.888 with 16, 0.889 with 32.) At a local optimum
    (no improving swap at all) a kick swaps random channels in a ``kick`` share of the groups, at
    most ``perturbations`` times; the best permutation seen is returned. ``rounds`` bounds the work:
    a round costs up to ``in * in * rows`` operations, so the default stops before convergence on
    wide layers."""
    st = scores.T.float().contiguous()
    cols, groups = st.shape[0], st.shape[0] // m
    p = torch.arange(cols)
    if groups < 2:
        return p
    group_of = torch.arange(cols) // m
    same_group = group_of.unsqueeze(1) == group_of.unsqueeze(0)
    best_value = retained(scores, p, n, m)
    best, kicks, tol = p.clone(), 0, 1e-4 * max(best_value, 1e-30) / cols  # float32 gains: ignore noise
    gains = _replacement_gains(st, p, torch.arange(groups), n, m)
    for _ in range(rounds):
        swap = gains[:, p]
        swap = (swap + swap.T).masked_fill_(same_group, -torch.inf)
        top = swap.topk(min(candidates, cols), dim=1)  # each position's best partners
        values, l = top.values.flatten(), top.indices.flatten()
        j = torch.arange(cols).repeat_interleave(top.indices.shape[1])
        picked = _disjoint(values, group_of[j], group_of[l], tol)
        if not picked:  # local optimum
            value = retained(scores, p, n, m)
            if value > best_value:
                best, best_value = p.clone(), value
            if kicks == perturbations:
                break
            kicks += 1
            order = torch.randperm(groups, generator=gen)[: 2 * max(1, int(kick * groups) // 2)]
            j, l = order.view(2, -1) * m + torch.randint(m, (2, order.numel() // 2), generator=gen)
            picked = list(range(j.numel()))
        j, l = j[picked], l[picked]
        _swap_positions(p, j, l)
        touched = torch.cat([group_of[j], group_of[l]])
        rows = (touched.unsqueeze(1) * m + torch.arange(m)).flatten()
        gains[rows] = _replacement_gains(st, p, touched, n, m)
    return best if best_value >= retained(scores, p, n, m) else p


def _ria(scores: torch.Tensor, n: int, m: int, gen: torch.Generator, *, rounds: int = 2) -> torch.Tensor:
    """RIA: snake-deal channels (by descending column sum) so every group gets one channel of each
    quantile band (slot), then, slot by slot for ``rounds`` rounds, give each group the slot channel
    that best completes its other ``m-1`` members: an exact linear assignment, so never a loss."""
    s = scores.double()
    cols, groups = s.shape[1], s.shape[1] // m
    order = torch.sort(s.sum(0), descending=True, stable=True).indices
    band, k = torch.arange(cols) // groups, torch.arange(cols) % groups
    slots = torch.empty(groups, m, dtype=torch.long)
    slots[torch.where(band % 2 == 0, k, groups - 1 - k), band] = order
    st = s.T.contiguous()  # (in, rows): channel scores contiguous for the inner reduction
    for _ in range(rounds if groups > 1 else 0):
        for j in range(m):
            grid = st[slots]  # (groups, m, rows)
            kept, nth = (x[:, j] for x in _leave_one_out(grid, grid, n)[:2])  # (groups, rows)
            value = _insert_values(st[slots[:, j]], nth) + kept.sum(-1)
            row, col = linear_sum_assignment(value.numpy(), maximize=True)
            slots[col, j] = slots[row, j].clone()
    return slots.reshape(-1)


# --------------------------------------------------------------------------------- output-aware search
def _swap_orders(m: int) -> torch.Tensor:
    """``(m*m, 2m)``: the two groups' members ``[a_0..a_m-1, b_0..b_m-1]`` after swapping ``a_i, b_j``
    (entry ``i*m + j``); a transposition, so it is its own inverse."""
    orders = torch.arange(2 * m).repeat(m * m, 1)
    i, j = torch.arange(m).repeat_interleave(m), torch.arange(m).repeat(m) + m
    rows = torch.arange(m * m)
    orders[rows, i], orders[rows, j] = j, i
    return orders


class _OutputError:
    """The layer's output error under permutation ``p``, kept up to date through swaps.

    Keeps the mask and ``G = d H`` (``d`` the pruned-away part of ``W``). A swap between groups ``a``
    and ``b`` changes ``d`` only on their ``2m`` channels, by ``Δ = W * (old_mask - new_mask)``, so the
    error changes by ``2 <Δ, G> + Δ H Δ^T`` with ``H`` restricted to those channels. Float64 so that
    thousands of incremental updates do not drift. ``drift`` adds the linear term that makes the error
    the one against the dense model's outputs (:class:`permsparse.calibration.InputStats`); it only
    shifts ``G``, so the swap arithmetic is unchanged.
    """

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor, scores: torch.Tensor,
                 p: torch.Tensor, n: int, m: int, drift: torch.Tensor | None = None):
        self.w, self.s, self.n, self.m = weight.double(), scores.double(), n, m
        self.h = _blocked_gram(gram, weight.shape[0])
        self.p = p.clone()
        self.mask = permuted_nm_mask(self.s, self.p, n, m)
        d = self.w * ~self.mask
        self.error, self.g = _error_and_grad(d, self.h)
        self.scale = self.error  # the start's sum_r d_r H d_r^T, a positive yardstick for the objective
        if drift is not None:  # error against the dense outputs: + 2 <W drift, d>, a constant shift of G
            shift = torch.bmm(self.w.reshape(self.h.shape[0], -1, self.w.shape[1]),
                              _blocked_gram(drift, weight.shape[0]))
            self.error += 2 * float((shift * d.reshape(shift.shape)).sum())
            self.g += shift
        self.kept = float((self.s * self.mask).sum())
        diag = self.h.diagonal(dim1=1, dim2=2).repeat_interleave(weight.shape[0] // self.h.shape[0], 0)
        self.w2h = self.w.square() * diag  # error of pruning one weight alone, W_rc^2 H_cc
        self.orders = _swap_orders(m)

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
        retained score, so it is a ``coef`` sum over kept entries that :func:`_swap_sums` gives
        without building a mask. Float32: it only ranks candidates."""
        old = self.mask.double()
        wg2 = 2 * self.w * self.g.reshape(self.w.shape[0], -1)
        coef = (1 - 2 * old) * self.w2h - wg2 - kept_weight * self.s
        base = old * (wg2 + self.w2h + kept_weight * self.s)
        s, coef, base = (_grouped(x.float(), self.p, self.m) for x in (self.s, coef, base))
        return (base[ga] + base[gb]).sum((1, 2)).unsqueeze(1) + _swap_sums(s, coef, ga, gb, self.n)

    def apply(self, ga: int, gb: int, swap: int, d_error: float, d_kept: float) -> None:
        """Swap member ``swap // m`` of group ``ga`` with member ``swap % m`` of group ``gb``, whose
        changes :meth:`swap_changes` gave, and update mask and ``G`` to match."""
        pos = torch.tensor([ga * self.m + swap // self.m, gb * self.m + swap % self.m])
        _swap_positions(self.p, pos[:1], pos[1:])
        grid = self.p.view(-1, self.m)
        touched = torch.cat([grid[ga], grid[gb]])
        new = nm_mask(self.s[:, touched], self.n, self.m)
        delta = self.w[:, touched] * (self.mask[:, touched].double() - new.double())
        self.mask[:, touched] = new
        self.g += torch.bmm(delta.reshape(self.h.shape[0], -1, touched.numel()), self.h[:, touched, :])
        self.error += d_error
        self.kept += d_kept


def _output(scores: torch.Tensor, n: int, m: int, gen: torch.Generator, start: torch.Tensor,
            chunk_groups: int, weight: torch.Tensor, gram: torch.Tensor, drift: torch.Tensor | None, *,
            rounds: int = 10, pairs: int = 1024, checks: int = 128, proxy_weight: float | None = None,
            time_limit: float | None = None) -> torch.Tensor:
    """Swap search on the true output error, from ``start`` (the ``ria`` permutation).

    Which error, measured on SmolLM2 2:4 Wanda with pruned-model statistics (bench/permutation.py
    protocol, ria 168.97): a linear's error against its own dense weights on the pruned model's inputs
    lowered layer errors but raised perplexity (178.92); blended with the retained host score
    (``proxy_weight=1``) it gave 160.42; the error against the dense model's outputs (``drift``) gave
    154.10 blended and 148.66 alone. So ``proxy_weight`` defaults to 0 with ``drift`` and to 1 without:
    the blend only made up for aiming at the wrong outputs.

    Each round draws ``pairs`` random group pairs (inside one chunk) and screens all their ``m*m``
    swaps at once (:meth:`_OutputError.screen`). Then, best screened first and on disjoint groups,
    at most ``checks`` pairs are evaluated exactly against the current ``G`` (swaps couple through
    ``H``, so gains do not simply add) and their best swap is made if it lowers the objective
    ``error/scale - proxy_weight * kept/kept_0`` (``scale`` the start's ``sum_r d_r H d_r^T``, so the
    two terms are comparable, with or without ``drift``). Every move lowers the objective, so the result is never worse than the start.
    ``time_limit`` (seconds) stops early but makes the result depend on machine speed.
    """
    state = _OutputError(weight, gram, scores, start, n, m, drift)
    if state.scale <= 0 or chunk_groups < 2:
        return start
    if proxy_weight is None:
        proxy_weight = 0.0 if drift is not None else 1.0
    kept_weight = proxy_weight * state.scale / state.kept if state.kept > 0 else 0.0  # in error units
    tol, groups, t0 = _TOL * state.scale, start.numel() // m, time.perf_counter()
    for _ in range(rounds):
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            break
        ga = torch.randint(groups, (pairs,), generator=gen)
        first = ga - ga % chunk_groups
        step = 1 + torch.randint(chunk_groups - 1, (pairs,), generator=gen)  # another group, same chunk
        gb = first + (ga - first + step) % chunk_groups
        gain = -state.screen(ga, gb, kept_weight).min(1).values
        for q in _disjoint(gain, ga, gb, tol)[:checks]:
            a, b = ga[q : q + 1], gb[q : q + 1]
            d_error, d_kept = state.swap_changes(a, b)
            objective = d_error[0] - kept_weight * d_kept[0]
            i = int(objective.argmin())
            if objective[i] < -tol:
                state.apply(int(a), int(b), i, float(d_error[0, i]), float(d_kept[0, i]))
    return state.p


# ------------------------------------------------------------------------------------------ front door
_SEARCHES = {"none": None, "cp": _cp, "ria": _ria, "output": _output}


def permutation_methods() -> list[str]:
    """Names accepted by :func:`find_permutation`."""
    return list(_SEARCHES)


def needs_gram(method: str) -> bool:
    """Whether ``method`` needs ``weight`` and the input Gram matrix (only the output-aware search)."""
    return method == "output"


def find_permutation(scores: torch.Tensor, n: int, m: int, method: str, *,
                     weight: torch.Tensor | None = None, gram: torch.Tensor | None = None,
                     drift: torch.Tensor | None = None, groups: int = 1, seed: int = 0,
                     **options) -> torch.Tensor:
    """Permutation ``p`` (``LongTensor`` of length ``in``) of the input channels of ``scores``.

    ``scores`` is ``(rows, in)`` and may stack several weights that read the same input. The N:M mask is
    then chosen on ``scores[:, p]``. ``groups > 1`` cuts the channels into that many contiguous chunks,
    each a multiple of ``m``, searched independently (``p`` keeps every channel inside its chunk): this
    bounds the cost on very wide layers. ``output`` needs ``weight`` (shape of ``scores``) and ``gram``
    (``(in, in)``, or ``(k, in, in)`` where row block ``i`` of ``weight`` reads ``gram[i]``); with
    ``drift`` (same shape, ``(X_dense - X)^T X``) it aims at the dense model's outputs instead of
    ``W``'s outputs on the same inputs (see :class:`permsparse.calibration.InputStats`).
    ``options`` go to the method (``cp``: rounds, perturbations, kick, candidates; ``ria``: rounds;
    ``output``: rounds, pairs, checks, proxy_weight, time_limit, ria_rounds). The same ``seed`` gives the
    same ``p``.
    """
    n, m = parse_pattern((n, m))
    if method not in _SEARCHES:
        raise ValueError(f"unknown permutation method {method!r}; choose one of {', '.join(_SEARCHES)}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be (rows, in), got shape {tuple(scores.shape)}")
    cols = scores.shape[1]
    if cols % m:
        raise ValueError(f"{cols} input channels are not divisible by M={m}")
    if groups < 1 or cols % groups or (cols // groups) % m:
        raise ValueError(
            f"groups={groups} must split {cols} channels into equal chunks that are multiples of M={m}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    gen = torch.Generator().manual_seed(seed)
    if method == "none":
        if options:
            raise ValueError(f"method 'none' takes no options, got {sorted(options)}")
        return torch.arange(cols)
    if method == "output":
        if weight is None or gram is None:
            raise ValueError("method 'output' needs both weight and gram")
        if weight.shape != scores.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} differs from scores {tuple(scores.shape)}")
        ria_options = {"rounds": options.pop("ria_rounds")} if "ria_rounds" in options else {}
        start = find_permutation(scores, n, m, "ria", groups=groups, seed=seed, **ria_options)
        return _call(_output, scores, n, m, gen, options, start=start, chunk_groups=cols // groups // m,
                     weight=weight, gram=gram, drift=drift)
    width = cols // groups
    parts = [_call(_SEARCHES[method], scores[:, c:c + width], n, m, gen, options) + c
             for c in range(0, cols, width)]
    return torch.cat(parts)


def _call(search, scores, n, m, gen, options, **fixed):
    """Run ``search``, turning an unknown option into a clear ValueError rather than a TypeError."""
    known = [k for k, v in inspect.signature(search).parameters.items() if v.kind is v.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for this method; known: {known}")
    return search(scores, n, m, gen, **fixed, **options)
