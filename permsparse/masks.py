"""N:M and unstructured masks.

An N:M mask keeps at most N weights in every run of M consecutive weights along the *input*
dimension (the last dimension of an ``(out, in)`` weight). It is chosen from an importance score of
the same shape: the top-N of each group win, and among equal scores the lower index wins, so the same
scores always give the same mask (dequantised GGUF weights tie in ~15% of 4-groups).
"""
from __future__ import annotations

import torch


def parse_pattern(pattern: str | tuple[int, int]) -> tuple[int, int]:
    """Turn ``"2:4"`` (or ``(2, 4)``) into ``(2, 4)``; reject anything that is not 0 < n < m."""
    if isinstance(pattern, str):
        parts = pattern.split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"pattern {pattern!r} is not of the form N:M (e.g. 2:4)")
        n, m = (int(p) for p in parts)
    else:
        n, m = pattern
    if not 0 < n < m:
        raise ValueError(f"pattern {n}:{m} is invalid: need 0 < N < M (e.g. 2:4, 4:8, 1:4)")
    return n, m


def parse_target(pattern: str) -> tuple[str, tuple[int, int] | float]:
    """``"2:4"`` -> ``("nm", (2, 4))``; an unstructured sparsity ``"50%"`` -> ``("unstructured", 0.5)`` (density)."""
    if pattern.endswith("%"):
        try:
            sparsity = float(pattern[:-1]) / 100
        except ValueError:
            raise ValueError(f"pattern {pattern!r} is neither N:M nor a percentage like 50%") from None
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"unstructured sparsity {pattern} must be between 0% and 100%")
        return "unstructured", 1.0 - sparsity
    return "nm", parse_pattern(pattern)


def _stable_topk_in_groups(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the top-``k`` entries along the last dim; ties go to the lower index.

    Sorting ``(score, -index)`` lexicographically is done with a stable descending sort: stable
    sort keeps the original (ascending index) order among equal keys.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, order, True)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the top-``n`` of every ``m`` consecutive scores along the last dimension.

    ``scores`` has shape ``(..., in)`` with ``in`` divisible by ``m``. Returns a bool tensor of the
    same shape. NaN scores are rejected, since they would make the choice arbitrary.
    """
    n, m = parse_pattern((n, m))
    if scores.shape[-1] % m:
        raise ValueError(f"last dimension {scores.shape[-1]} is not divisible by M={m}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    grouped = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    return _stable_topk_in_groups(grouped, n).reshape(scores.shape)


def permuted_nm_mask(scores: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M mask chosen on ``scores[:, perm]``, put back in the original column order.

    This is what a permutation does to a layer: the effective pruned weight is ``W * mask``.
    """
    mask = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    mask[:, perm] = nm_mask(scores[:, perm], n, m)
    return mask


def unstructured_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the top ``density`` fraction of every row (per-output pruning, as Wanda does).

    This is the reference limit for N:M at the same density: no permutation can keep more score.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density {density} must be in (0, 1]")
    keep = int(round(scores.shape[-1] * density))
    return _stable_topk_in_groups(scores, keep)


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive entries along the last dim has at most ``n`` non-zeros."""
    if weight.shape[-1] % m:
        return False
    nonzero = (weight != 0).reshape(*weight.shape[:-1], weight.shape[-1] // m, m).sum(-1)
    return bool((nonzero <= n).all())
