"""What both weight-updating hosts share: the result record, argument checks, and the handling of a
permutation (the algorithm runs on the permuted columns ``W[:, perm]``, ``H[perm][:, perm]`` and the
result goes back to the original column order) and of a fixed mask."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sparsity.masks import as_permutation, nm_violation

COMPUTE_DTYPE = torch.float32


@dataclass(frozen=True, eq=False)
class UpdateResult:
    """What a weight-updating pruner returns for one linear layer.

    ``weight``: the pruned, updated ``(out, in)`` weight, in the input's dtype, device and column order,
    exactly zero wherever ``mask`` is False. ``mask``: the bool keep-mask, original column order.
    ``error``: the layer's output error ``sum_r d_r H d_r^T`` for ``d = W - weight`` with the undamped
    ``H`` that was passed in, i.e. ``||X W^T - X weight^T||^2`` over the calibration tokens.
    """

    weight: torch.Tensor
    mask: torch.Tensor
    error: float


def check_target(weight: torch.Tensor, n: int | None, m: int | None, density: float | None,
                 mask: torch.Tensor | None) -> None:
    """Reject a call that does not name exactly one target: ``n``/``m``, ``density`` or a fixed ``mask``.

    With ``mask`` given, ``n``/``m`` may still be passed; the mask is then checked against the pattern
    later, in the order the columns are processed.
    """
    if (n is None) != (m is None):
        raise ValueError("give both n and m (an N:M pattern) or neither")
    if n is not None and density is not None:
        raise ValueError("give either an N:M pattern (n, m) or a density, not both")
    if n is None and density is None and mask is None:
        raise ValueError("give an N:M pattern (n, m), a density or a fixed mask")
    if n is not None and not 0 < n < m:
        raise ValueError(f"pattern {n}:{m} is invalid: need 0 < N < M")
    if n is not None and weight.shape[1] % m:
        raise ValueError(f"in-features {weight.shape[1]} is not divisible by M={m}")
    if density is not None and not 0.0 < density <= 1.0:
        raise ValueError(f"density {density} must be in (0, 1]")


def to_processing_order(weight: torch.Tensor, hessian: torch.Tensor, perm: torch.Tensor | None,
                        mask: torch.Tensor | None, n: int | None = None, m: int | None = None):
    """The weight, Hessian and mask with their input columns in the order the algorithm visits them.

    That order is ``perm`` (the permuted layer is ``W[:, perm]``) or the natural one. The weight and
    Hessian come back as ``COMPUTE_DTYPE`` copies the caller may modify; a given ``mask`` is checked for
    shape and, when ``n``/``m`` are given, for the N:M pattern in this order.
    """
    if weight.dim() != 2:
        raise ValueError(f"weight must be (out, in), got shape {tuple(weight.shape)}")
    cols = weight.shape[1]
    if hessian.shape != (cols, cols):
        raise ValueError(f"hessian must be ({cols}, {cols}) for a weight {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}")
    if mask is not None and (mask.shape != weight.shape or mask.dtype != torch.bool):
        raise ValueError(f"mask must be a bool tensor of shape {tuple(weight.shape)}")
    w = weight.detach().to(COMPUTE_DTYPE)
    h = hessian.detach().to(device=weight.device, dtype=COMPUTE_DTYPE)
    if perm is not None:
        perm = as_permutation(perm, cols, "perm").to(weight.device)
        w, h = w[:, perm], h[perm][:, perm]
        if mask is not None:
            mask = mask[:, perm]
    w = w.clone()
    h = h.clone()
    if mask is not None:
        mask = mask.to(weight.device)
        if n is not None and nm_violation(mask, n, m):
            raise ValueError(f"the fixed mask keeps more than {n} of some group of {m} columns (in the processing "
                             f"order): {nm_violation(mask, n, m)}")
    return w, h, mask


def to_original_order(tensor: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """Undo :func:`to_processing_order` on the columns of an ``(out, in)`` tensor."""
    if perm is None:
        return tensor
    out = torch.empty_like(tensor)
    out[:, perm.to(tensor.device)] = tensor
    return out


def output_error(diff: torch.Tensor, hessian: torch.Tensor) -> float:
    """``sum_r d_r H d_r^T`` for the rows ``d_r`` of ``diff`` (both in the same column order)."""
    return float(((diff @ hessian) * diff).sum(dtype=torch.float64))


def finish(weight: torch.Tensor, updated: torch.Tensor, keep: torch.Tensor, perm: torch.Tensor | None,
           error: float) -> UpdateResult:
    """Package an update computed in processing order as an :class:`UpdateResult` in original order."""
    updated = torch.where(keep, updated, updated.new_zeros(()))
    out = to_original_order(updated, perm).to(weight.dtype)
    return UpdateResult(weight=out, mask=to_original_order(keep, perm), error=error)


def dead_inputs(hessian: torch.Tensor) -> torch.Tensor:
    """Inputs that are zero on every calibration token (zero diagonal of ``H``)."""
    return torch.diagonal(hessian) == 0
