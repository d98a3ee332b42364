"""N:M and unstructured masks, and the checks of N:M patterns and permutations.

An N:M mask keeps at most N weights in every run of M consecutive weights along the *input*
dimension (the last dimension of an ``(out, in)`` weight). It is chosen from an importance score of
the same shape: the top-N of each group win, and among equal scores the lower index wins, so the same
scores always give the same mask (dequantised GGUF weights tie in ~15% of 4-groups).

A permutation ``p`` of the input channels means the permuted layer is ``W[:, p]``: position ``j``
holds original channel ``p[j]``.
"""
from __future__ import annotations

import torch


def _stable_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the top-``k`` entries along the last dim; ties go to the lower index.

    A stable descending sort keeps the original (ascending index) order among equal keys.
    """
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(-1, order, True)


def group_ranks(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """For each member of the groups laid along ``dim``, how many members of its group beat it: a higher
    score, or an equal one at a lower position. The top-``k`` of a group are the members ranked below
    ``k``, exactly as a stable descending sort orders them; ``m`` comparisons of whole tensors are
    faster than sorting many tiny groups."""
    m = scores.shape[dim]
    rank = torch.zeros(scores.shape, dtype=torch.uint8 if m < 256 else torch.int32, device=scores.device)
    for k in range(m):
        member = scores.narrow(dim, k, 1)
        rank.narrow(dim, 0, k).add_(member > scores.narrow(dim, 0, k))
        rank.narrow(dim, k + 1, m - k - 1).add_(member >= scores.narrow(dim, k + 1, m - k - 1))
    return rank


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the top-``n`` of every ``m`` consecutive scores along the last dimension.

    ``scores`` has shape ``(..., in)`` with ``in`` divisible by ``m``. Returns a bool tensor of the
    same shape. NaN scores are rejected, since they would make the choice arbitrary.
    """
    if scores.shape[-1] % m:
        raise ValueError(f"last dimension {scores.shape[-1]} is not divisible by M={m}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    grouped = scores.reshape(*scores.shape[:-1], scores.shape[-1] // m, m)
    return (group_ranks(grouped, -1) < n).reshape(scores.shape)


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
    return _stable_topk(scores, int(round(scores.shape[-1] * density)))


def nm_violation(weight: torch.Tensor, n: int, m: int) -> str:
    """Empty when every group of ``m`` consecutive entries along the last dim has at most ``n``
    non-zeros; else a description of the first offending group and how many there are."""
    if weight.shape[-1] % m:
        return f"in_features {weight.shape[-1]} not divisible by {m}"
    counts = (weight != 0).reshape(-1, weight.shape[-1] // m, m).sum(-1)
    bad = (counts > n).nonzero()
    if not len(bad):
        return ""
    row, group = bad[0].tolist()
    return (f"{len(bad)} groups with more than {n} non-zeros (first: row {row}, columns {group * m}.."
            f"{group * m + m - 1} holds {int(counts[row, group])})")


def is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive entries along the last dim has at most ``n`` non-zeros."""
    return not nm_violation(weight, n, m)


def as_permutation(perm, width: int, what: str = "permutation") -> torch.Tensor:
    """``perm`` as a CPU LongTensor, or a ValueError when it is not a permutation of ``range(width)``."""
    p = torch.as_tensor(perm, dtype=torch.long).flatten().cpu()
    if p.numel() != width or not torch.equal(torch.sort(p).values, torch.arange(width)):
        raise ValueError(f"{what} is not a permutation of {width} channels")
    return p
