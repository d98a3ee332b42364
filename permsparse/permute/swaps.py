"""Batched swap arithmetic shared by the searches.

Retained score and output error of a swap only depend on the two groups it touches, so every search
scores many candidate swaps in one batched tensor step instead of a loop over groups. Groups are held
as ``(groups, m, rows)``: rows innermost, so the sums over rows run over contiguous memory.
"""
from __future__ import annotations

import torch

from ..sparsity.masks import group_ranks


def leave_one_out(s: torch.Tensor, coef: torch.Tensor, n: int):
    """For each member ``i`` of groups of scores ``s`` (``(..., m, rows)``, position order), as if ``i``
    had left: the sum of ``coef`` over the top-``n`` of the others, and the score, position and ``coef``
    of the ``n``-th of the others (the weakest survivor). All ``(..., m, rows)``.

    A newcomer joins the kept set exactly when it beats that weakest survivor, and then replaces it.
    This turns "the group with one member exchanged" into one comparison, which is what makes the
    batched searches cheap: no mask is ever re-sorted per candidate.
    """
    rank, inside = _ranks(s, n)
    pos = torch.arange(s.shape[-2], dtype=s.dtype, device=s.device).view(-1, 1)
    at = [(rank == r).to(s.dtype) for r in (n - 1, n)]  # one-hot: the n-th and the (n+1)-th
    s_at, c_at, p_at = ([(x * a).sum(-2, keepdim=True) for a in at] for x in (s, coef, pos))
    kept = (coef * inside).sum(-2, keepdim=True) + inside * (c_at[1] - coef)
    pick = lambda x: x[0] + inside * (x[1] - x[0])  # noqa: E731  (exact: picks one of the two)
    return kept, pick(s_at), pick(p_at), pick(c_at)


def leave_member_out(s: torch.Tensor, n: int, member: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`leave_one_out` of scores that are their own worth (``coef = s``), for one member only:
    ``kept`` and the weakest survivor's score, ``(..., 1, rows)``, by the same arithmetic."""
    rank, inside = _ranks(s, n)
    s_at = [(s * (rank == r).to(s.dtype)).sum(-2, keepdim=True) for r in (n - 1, n)]
    one = inside[..., member:member + 1, :]
    kept = (s * inside).sum(-2, keepdim=True) + one * (s_at[1] - s[..., member:member + 1, :])
    return kept, s_at[0] + one * (s_at[1] - s_at[0])


def _ranks(s: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~permsparse.sparsity.masks.group_ranks` of the groups' members, and whether each is kept (``rank <
    n``, as a float of ``s``'s type)."""
    rank = group_ranks(s, -2)
    return rank, (rank < n).to(s.dtype)


def exchange(stats: list[torch.Tensor], new: torch.Tensor, new_coef: torch.Tensor,
              chunk: int = 32) -> torch.Tensor:
    """``[q, i, j]``: sum over rows of ``coef`` over the kept members of a group after its member ``i``
    is replaced by ``new[q, j]`` (which takes position ``i``, the N:M tie-break).

    ``stats`` is :func:`leave_one_out` of the receiving groups, ``new``/``new_coef`` the incoming
    scores and worths ``(pairs, m, rows)``. The ``(pairs, m, m, rows)`` comparison runs ``chunk``
    pairs at a time, to stay in cache.
    """
    kept, nth, nth_pos, nth_coef = stats
    earlier = torch.arange(new.shape[-2], device=new.device).view(-1, 1) < nth_pos  # newcomer at i wins ties:
    bar = nth + earlier * (nth.nextafter(torch.full_like(nth, -torch.inf)) - nth)  # lower the bar 1 ulp
    s, c = new.unsqueeze(-3), new_coef.unsqueeze(-3)
    bar, nth_coef = bar.unsqueeze(-2), nth_coef.unsqueeze(-2)
    out = kept.sum(-1).unsqueeze(-1).repeat(1, 1, new.shape[-2])
    for q in range(0, new.shape[0], chunk):
        part = slice(q, q + chunk)
        out[part] += ((s[part] > bar[part]) * (c[part] - nth_coef[part])).sum(-1)
    return out


def swap_sums(s: torch.Tensor, coef: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor,
               n: int) -> torch.Tensor:
    """``(pairs, m*m)``: sum of ``coef`` over the kept entries of groups ``ga[q]`` and ``gb[q]`` after
    swapping their members ``i`` and ``j`` (entry ``i*m + j``). ``s``, ``coef``: ``(groups, m, rows)``.

    With ``coef = s`` this is the retained score of the two groups; only they change, so it is exact.
    """
    stats = leave_one_out(s, coef, n)  # once per group, however many pairs use it
    into_a = exchange([x[ga] for x in stats], s[gb], coef[gb])
    into_b = exchange([x[gb] for x in stats], s[ga], coef[ga])
    return (into_a + into_b.transpose(-1, -2)).flatten(1)


def disjoint(gain: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, tol: float) -> list[int]:
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


def swap_positions(p: torch.Tensor, pos_a: torch.Tensor, pos_b: torch.Tensor) -> None:
    """Swap the channels at positions ``pos_a[q]`` and ``pos_b[q]`` (all disjoint), in place."""
    p[pos_a], p[pos_b] = p[pos_b].clone(), p[pos_a].clone()


TILE_ELEMENTS = {"cpu": 2**19, "cuda": 2**27}  # elements of one broadcast tile of :func:`insert_values`


def insert_values(cand: torch.Tensor, nth: torch.Tensor) -> torch.Tensor:
    """``out[c, g] = sum_r relu(cand[c, r] - nth[g, r])``: what channel ``c`` adds to a group whose
    weakest survivor is ``nth[g]`` (see :func:`leave_one_out`).

    This is the hot loop of ``cp`` and ``ria``. It runs as ``sum_r max(cand, nth) - sum_r nth`` (two
    passes over the broadcast instead of three) in square tiles: of about 512K elements on the CPU, which
    stay in cache, and of about 128M on a GPU, where each tile is one launch and launches are what cost
    (:data:`TILE_ELEMENTS`). Each entry is the same sum in either tiling. The float32 cancellation error
    (about ``rows * 1e-7`` of a score) is far below the gains the searches act on.
    """
    tile = max(8, int((TILE_ELEMENTS.get(cand.device.type, TILE_ELEMENTS["cpu"]) / cand.shape[1]) ** 0.5))
    out = torch.empty(cand.shape[0], nth.shape[0], dtype=cand.dtype, device=cand.device)
    for g in range(0, nth.shape[0], tile):
        block = nth[None, g:g + tile]
        for i in range(0, cand.shape[0], tile):
            torch.sum(torch.maximum(cand[i:i + tile, None, :], block), -1, out=out[i:i + tile, g:g + tile])
    return out - nth.sum(-1)


