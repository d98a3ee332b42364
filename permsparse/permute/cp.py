"""Pool & Yu's channel permutation (NeurIPS 2021; NVIDIA ASP): greedy swaps of two channels between
two groups that raise the retained score, with a few random kicks out of local optima."""
from __future__ import annotations

import torch

from .metrics import kept_sum, retained
from .swaps import disjoint, insert_values, leave_one_out, swap_positions


def _replacement_gains(st: torch.Tensor, p: torch.Tensor, groups: torch.Tensor, n: int,
                       m: int) -> torch.Tensor:
    """``out[j, c]``: retained-score change of the group at position ``j`` (for all positions of
    ``groups``) if channel ``c`` took the place of its channel. ``st`` is ``scores.T`` (``(in, rows)``).

    Only the row's own group enters, so a swap of positions ``j, l`` gains exactly
    ``out[j, p[l]] + out[l, p[j]]``, and after a swap only the rows of the two groups change.
    """
    grid = st[p].view(-1, m, st.shape[1])[groups]
    kept, nth = leave_one_out(grid, grid, n)[:2]
    loss = (kept.sum(-1) - kept_sum(grid, n).sum(-1, keepdim=True)).reshape(-1, 1)
    return insert_values(st, nth.reshape(-1, st.shape[1])).T + loss


def cp(scores: torch.Tensor, n: int, m: int, gen: torch.Generator, *, rounds: int = 12,
        perturbations: int = 2, kick: float = 0.05, candidates: int = 16) -> torch.Tensor:
    """Pool & Yu channel swaps. Keeps the exact gain of every swap of two channels in different
    groups (see :func:`_replacement_gains`); each round takes every position's ``candidates`` best
    partners, makes the best improving swaps among them on disjoint groups (their gains add) and
    refreshes the rows of the groups that changed. Per-position candidates rather than one global top
    list spread a round over many groups (a global list crowds onto a few hub groups); too few per
    position stall on wide layers. At a local optimum
    (no improving swap at all) a kick swaps random channels in a ``kick`` share of the groups, at
    most ``perturbations`` times; the best permutation seen is returned. ``rounds`` bounds the work:
    a round costs up to ``in * in * rows`` operations, so the default stops before convergence on
    wide layers."""
    st = scores.T.float().contiguous()
    cols, groups, device = st.shape[0], st.shape[0] // m, st.device
    p = torch.arange(cols, device=device)
    if groups < 2:
        return p
    group_of = torch.arange(cols, device=device) // m
    same_group = group_of.unsqueeze(1) == group_of.unsqueeze(0)
    best_value = retained(scores, p, n, m)
    best, kicks, tol = p.clone(), 0, 1e-4 * max(best_value, 1e-30) / cols  # float32 gains: ignore noise
    gains = _replacement_gains(st, p, torch.arange(groups, device=device), n, m)
    for _ in range(rounds):
        swap = gains[:, p]
        swap = (swap + swap.T).masked_fill_(same_group, -torch.inf)
        top = swap.topk(min(candidates, cols), dim=1)  # each position's best partners
        values, l = top.values.flatten(), top.indices.flatten()
        j = torch.arange(cols, device=device).repeat_interleave(top.indices.shape[1])
        picked = disjoint(values, group_of[j], group_of[l], tol)
        if not picked:  # local optimum
            value = retained(scores, p, n, m)
            if value > best_value:
                best, best_value = p.clone(), value
            if kicks == perturbations:
                break
            kicks += 1
            order = torch.randperm(groups, generator=gen)[: 2 * max(1, int(kick * groups) // 2)]
            j, l = (order.view(2, -1) * m + torch.randint(m, (2, order.numel() // 2), generator=gen)).to(device)
            picked = list(range(j.numel()))
        j, l = j[picked], l[picked]
        swap_positions(p, j, l)
        touched = torch.cat([group_of[j], group_of[l]])
        rows = (touched.unsqueeze(1) * m + torch.arange(m, device=device)).flatten()
        gains[rows] = _replacement_gains(st, p, touched, n, m)
    return best if best_value >= retained(scores, p, n, m) else p
