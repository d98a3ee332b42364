"""The compressed 2:4 format the Triton kernel reads: the kept values and their 2-bit positions.

A weight ``(out, in)`` that is 2:4 in storage order keeps at most 2 of every 4 consecutive inputs. It is
stored as

- ``values`` ``(out, in/2)``, the weight's dtype: the two kept entries of every group of 4, in column
  order;
- ``meta`` ``(out, in/8)`` uint8: per group the 4-bit code ``i0 | i1 << 2`` of the kept positions
  ``i0 < i1`` within the group, two groups a byte (the even group in the low nibble).

A group with fewer than two non-zeros keeps zeros at its lowest zero positions, so every code names two
distinct positions and ``decompress(*compress(w))`` equals ``w`` exactly. For fp16 and bf16 this is
56.25% of the dense bytes (values 50%, metadata 6.25%) – what a memory-bound decode step reads.
"""
from __future__ import annotations

import torch

from ..sparsity.masks import nm_violation

__all__ = ["compress", "decompress", "format_problem"]


def format_problem(weight: torch.Tensor) -> str:
    """Why ``weight`` cannot be stored in this format ("" when it can): not 2-D, a width the metadata bytes
    do not tile, or a group of 4 with more than 2 non-zeros (the first one named)."""
    if weight.dim() != 2:
        return f"a 2:4 weight is 2-D (out, in); this one has shape {tuple(weight.shape)}"
    if weight.shape[1] % 8:
        return f"in_features {weight.shape[1]} is not a multiple of 8 (one metadata byte holds two groups of 4)"
    violation = nm_violation(weight, 2, 4)
    return f"not 2:4 in storage order: {violation}" if violation else ""


def compress(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, meta)`` of a weight that is 2:4 in storage order; ValueError (naming the first bad group)
    otherwise."""
    problem = format_problem(weight)
    if problem:
        raise ValueError(problem)
    out, width = weight.shape
    groups = weight.reshape(out, width // 4, 4)
    # non-zeros first, then zeros, each by position: the first two are the kept positions
    order = ((groups == 0).to(torch.int8) * 4 + torch.arange(4, dtype=torch.int8, device=weight.device)).argsort(-1)
    kept = order[..., :2].sort(-1).values
    values = groups.gather(-1, kept).reshape(out, width // 2)
    codes = (kept[..., 0] | (kept[..., 1] << 2)).to(torch.uint8).reshape(out, width // 8, 2)
    meta = codes[..., 0] | (codes[..., 1] << 4)
    return values.contiguous(), meta.contiguous()


def decompress(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense ``(out, in)`` weight of ``(values, meta)``."""
    out, half = values.shape
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (out, half // 4):
        raise ValueError(f"metadata of shape {tuple(meta.shape)} ({meta.dtype}) does not match values of shape "
                         f"{tuple(values.shape)}: expected ({out}, {half // 4}) uint8")
    codes = torch.stack([meta & 15, meta >> 4], -1).reshape(out, half // 2).long()
    kept = torch.stack([codes & 3, codes >> 2], -1)
    dense = values.new_zeros(out, half // 2, 4)
    dense.scatter_(-1, kept, values.reshape(out, half // 2, 2))
    return dense.reshape(out, half * 2)
