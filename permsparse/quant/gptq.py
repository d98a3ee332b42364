"""GPTQ (Frantar et al. 2023) on the entries an N:M mask keeps: quantize one pruned linear with error
compensation, its pruned entries staying exactly zero.

The layer's output error is ``||X W^T - X Q^T||^2 = sum_r d_r H d_r^T`` for ``d = W - Q`` and ``H = X^T X``.
GPTQ walks the stored input columns left to right; at column ``c`` it rounds the column's weights and moves
the rounding error onto the columns not yet reached, the Optimal Brain Surgeon update with the inverse
Hessian of those columns (the rows of the upper Cholesky factor ``U`` of ``H^-1``, as in SparseGPT). A
pruned entry is a weight whose target is 0, not a rounded value: when the walk reaches it, whatever the
earlier updates moved onto it is taken off again and moved on to the later columns, as SparseGPT does for
a fixed mask. So every step is the exact OBS update for the columns still free, and the result is zero
on every pruned entry. Scales: per output channel from the pruned weight up front (int8, fp8); per group
from the weights as updated so far when the walk reaches the group's first column (int4), so the scale
fits the values it rounds. Updates are applied lazily in blocks of columns, as in SparseGPT.
"""
from __future__ import annotations

import torch

from . import QuantizedWeight
from .rtn import quantize, scales

BLOCK = 128


def gptq(weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor, kind: str, group: int,
         input_order: torch.Tensor | None = None, damp: float = 0.01) -> QuantizedWeight:
    """Quantize ``weight`` (``(out, in)``, original input order, zero where ``keep`` is False) with GPTQ.

    ``hessian`` is ``H = X^T X`` over the calibration tokens (original order); ``input_order`` the storage
    order (the permutation the N:M groups and the quantization groups are chosen in). ``H`` is dampened by
    ``damp * mean(diag(H))``; inputs no calibration token reaches (zero diagonal) get a unit diagonal. The
    computation runs in float32.
    """
    order = torch.arange(weight.shape[1], device=weight.device) if input_order is None else input_order
    w = weight.float()[:, order].clone()
    kept = keep[:, order]
    h = hessian.float()[order][:, order].clone()
    cols = w.shape[1]
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    diag = torch.arange(cols, device=h.device)
    h[diag, diag] += damp * torch.mean(torch.diagonal(h))
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    del h

    per_group = group < cols
    scale = None if per_group else scales(w * kept, kind, group)
    group_scales = []
    block = group * max(1, BLOCK // group) if per_group else BLOCK  # a group never straddles two blocks
    values = torch.zeros_like(w)  # the codes, as float32 (exact for every kind)
    for start in range(0, cols, block):
        stop = min(start + block, cols)
        w1 = w[:, start:stop].clone()
        u1 = u[start:stop, start:stop]
        err1 = torch.zeros_like(w1)
        for i in range(stop - start):
            c = start + i
            if per_group and c % group == 0:
                scale = scales(w1[:, i:i + group] * kept[:, c:c + group], kind, group)
                group_scales.append(scale)
            col = w1[:, i]
            code = quantize((col * kept[:, c])[:, None], kind, 1, scale).float()[:, 0]  # pruned: code 0
            values[:, c] = code
            err = (col - code * scale[:, 0]) / u1[i, i]
            w1[:, i:].addr_(err, u1[i, i:], alpha=-1)
            err1[:, i] = err
        w[:, stop:] -= err1 @ u[start:stop, stop:]
    scale = torch.cat(group_scales, dim=1) if per_group else scale
    codes = values.to(torch.float8_e4m3fn) if kind == "fp8" else values.to(torch.int8)
    return QuantizedWeight(kind, codes, scale, group, input_order)
