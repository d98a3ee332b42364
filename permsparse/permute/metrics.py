"""How good a permutation is for one layer: retained host score, efficacy, and output error.

A permutation ``p`` reorders input channels: the permuted layer is ``W[:, p]`` and its N:M mask is
chosen on ``scores[:, p]``. Which channels share a group of M decides which weights survive.
"""
from __future__ import annotations

import torch

from ..sparsity.masks import permuted_nm_mask

TOL = 1e-9  # relative gain below which a move counts as no gain (float noise)


def grouped(scores: torch.Tensor, p: torch.Tensor, m: int) -> torch.Tensor:
    """``scores[:, p]`` as ``(groups, m, rows)``: rows innermost, so that the sums over rows that every
    search ends with run over contiguous memory (a size-``m`` inner dimension is several times slower)."""
    return scores.T[p].reshape(-1, m, scores.shape[0])


def kept_sum(x: torch.Tensor, n: int) -> torch.Tensor:
    """What an N:M mask keeps of each group of ``x`` (``(..., m, rows)``): the sum of the top ``n``."""
    return x.topk(n, dim=-2).values.sum(-2)


def retained(scores: torch.Tensor, p: torch.Tensor, n: int, m: int) -> float:
    """Score kept by the N:M mask of ``scores[:, p]``, ``R(p)`` in docs/method.md."""
    return float(kept_sum(grouped(scores.double(), p, m), n).sum())


def efficacy(scores: torch.Tensor, p: torch.Tensor, n: int, m: int) -> float:
    """Share of the identity's gap to the unstructured bound that ``p`` closes (Pool & Yu 2021).

    The bound keeps the top ``in*N/M`` of every row, which no permutation can beat. When the identity
    already reaches it there is nothing to close, and any ``p`` that also reaches it scores 1.
    """
    s = scores.double()
    ident = retained(s, torch.arange(s.shape[1], device=s.device), n, m)
    bound = float(s.topk(s.shape[1] * n // m, dim=1).values.sum())
    gain = retained(s, p, n, m) - ident
    if bound - ident <= TOL * max(abs(bound), 1.0):
        return 1.0 if gain >= -TOL * max(abs(bound), 1.0) else float("-inf")
    return gain / (bound - ident)


def blocked_gram(gram: torch.Tensor, rows: int) -> torch.Tensor:
    """Gram as ``(k, in, in)``; with ``k > 1`` row block ``i`` of the weight reads ``gram[i]``."""
    g = gram.unsqueeze(0) if gram.dim() == 2 else gram
    if g.dim() != 3 or g.shape[1] != g.shape[2]:
        raise ValueError(f"gram must be (in, in) or (k, in, in), got {tuple(gram.shape)}")
    if rows % g.shape[0]:
        raise ValueError(f"{rows} weight rows do not split into {g.shape[0]} gram blocks")
    return g.double()


def error_and_grad(d: torch.Tensor, h: torch.Tensor) -> tuple[float, torch.Tensor]:
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
    return error_and_grad(d, blocked_gram(gram, weight.shape[0]))[0]


