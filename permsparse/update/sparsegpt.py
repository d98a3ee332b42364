"""SparseGPT (Frantar & Alistarh 2023): prune one linear layer and update the weights it keeps.

A linear ``y = x W^T`` with calibration inputs ``X`` (tokens x ``in``) has the output error
``||X W^T - X Ŵ^T||^2 = sum_r d_r H d_r^T`` for ``d = W - Ŵ`` and ``H = X^T X``. SparseGPT walks the
input columns left to right; when it zeroes column ``c`` of a row it moves the lost contribution onto
the columns not yet reached, the Optimal Brain Surgeon update with the inverse Hessian of those
columns. Those inverses are the rows of the upper Cholesky factor ``U`` of ``H^-1`` (``H^-1 = U^T U``),
so one factorisation serves every column and every row. Updates are applied lazily: column by column
only inside short runs of columns, to the rest of a block of ``block_size`` columns once per run, and to
the rest of the layer once per block, the last two as matrix products (same result, far less memory
traffic than updating every remaining column after every column).

"""
from __future__ import annotations

import torch

from ..sparsity.masks import nm_mask
from .common import UpdateResult, check_target, dead_inputs, finish, to_processing_order

INNER_BLOCK = 16


def _block_mask(saliency: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of highest saliencies of one block of columns, over all rows at once.

    Equal saliencies go to the lower (row-major) index, so the choice is deterministic.
    """
    flat = saliency.flatten()
    keep = int(round(flat.numel() * density))
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[order] = True
    return mask.reshape(saliency.shape)


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, n: int | None = None, m: int | None = None, *,
              density: float | None = None, perm: torch.Tensor | None = None, mask: torch.Tensor | None = None,
              block_size: int = 128, damp: float = 0.01) -> UpdateResult:
    """Prune ``weight`` (``(out, in)``) with SparseGPT and return the updated weight and its mask.

    ``hessian`` is ``H = X^T X`` over the calibration tokens, ``(in, in)``. The target is one of:

    - ``n, m``: an N:M pattern. At the first column of each group of ``m`` consecutive columns the
      group's mask is chosen from the weights as updated so far: each row keeps the ``n`` largest
      saliencies ``w_c^2 / U_cc^2``, where ``U_cc^2`` is ``[H_F^-1]_cc`` for the Hessian ``H_F`` of the
      columns not yet processed, so the choice already accounts for the compensation to come.
    - ``density``: unstructured sparsity. At the start of each block of ``block_size`` columns the
      block keeps its ``density`` fraction of highest saliencies over all its rows together, so rows may
      differ in density while the layer (and every block) keeps exactly ``density``.
    - ``mask``: a fixed bool keep-mask ``(out, in)`` in the original column order; only the weight update
      runs (for a mask chosen elsewhere, e.g. with a learned permutation). Passing ``n``/``m`` as well
      checks that the mask is N:M in the processing order.

    ``perm`` (a permutation of the input columns; the permuted layer is ``W[:, perm]``) makes the
    algorithm run on ``W[:, perm]`` with ``H[perm][:, perm]``, so N:M groups are groups of ``m``
    consecutive *permuted* columns; the result comes back in the original column order.

    ``H`` is dampened by ``damp * mean(diag(H))`` on its diagonal so its Cholesky factorisation exists
    and the updates stay moderate. Inputs that are zero on all calibration tokens (zero diagonal) get a
    unit diagonal and a zero weight: they never reach the output, so zeroing them costs nothing and makes
    them the first to be pruned. ``block_size`` sets how many columns share one lazy update; it must be a
    multiple of ``m``. The computation runs in float32, as the reference does. The reported error comes
    from the OBS errors already at hand rather than from another ``(out, in, in)`` product; it agrees with
    the direct ``sum_r d_r H d_r^T`` to about 1e-6 relative.
    """
    check_target(weight, n, m, density, mask)
    if block_size <= 0 or (m is not None and block_size % m):
        raise ValueError(f"block_size {block_size} must be a positive multiple of M={m}")
    w, h, fixed = to_processing_order(weight, hessian, perm, mask, n, m)
    cols = w.shape[1]

    dead = dead_inputs(h)
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    dense = w.clone()
    diag = torch.arange(cols, device=h.device)
    ridge = damp * torch.mean(torch.diagonal(h))
    h[diag, diag] += ridge
    # U with H^-1 = U^T U: row c of U (from c on) is the OBS update direction for column c, U_cc its scale.
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    del h

    # Two levels of lazy updates: column by column inside runs of `inner` columns (whole N:M groups, so
    # a group is up to date when its mask is chosen), run by run inside a block, block by block across
    # the layer. Only the innermost level is a rank-1 update; the others are matrix products.
    inner = INNER_BLOCK if m is None else m * max(1, INNER_BLOCK // m)
    keep = torch.ones_like(w, dtype=torch.bool)
    damped_error = torch.zeros((), dtype=torch.float64, device=w.device)
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        w1 = w[:, start:stop].clone()
        u1 = u[start:stop, start:stop]
        d1 = torch.diagonal(u1)
        err1 = torch.zeros_like(w1)
        if fixed is not None:
            keep1 = fixed[:, start:stop]
        elif density is not None:
            keep1 = _block_mask(w1.square() / d1.square(), density)
        else:
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        for sub in range(0, stop - start, inner):
            sub_stop = min(sub + inner, stop - start)
            for i in range(sub, sub_stop):
                if fixed is None and density is None and i % m == 0:
                    keep1[:, i:i + m] = nm_mask(w1[:, i:i + m].square() / d1[i:i + m].square(), n, m)
                col = w1[:, i]
                q = torch.where(keep1[:, i], col, col.new_zeros(()))
                err = (col - q) / d1[i]
                w1[:, i:sub_stop].addr_(err, u1[i, i:sub_stop], alpha=-1)
                w1[:, i] = q  # exact: the update above leaves q up to rounding
                err1[:, i] = err
            w1[:, sub_stop:] -= err1[:, sub:sub_stop] @ u1[sub:sub_stop, sub_stop:]
        w[:, start:stop] = w1
        keep[:, start:stop] = keep1
        w[:, stop:] -= err1 @ u[start:stop, stop:]
        damped_error += err1.double().square().sum()
    # W - Ŵ = E U for the scaled errors E, and U H_damped U^T = I, so the dampened output error is
    # ||E||^2; removing the ridge's share gives the undamped error without another (out, in, in) product.
    # Dead inputs add nothing: their rows of H are zero and their weights are zero on both sides.
    error = damped_error - ridge.double() * (dense - w).double().square().sum()
    return finish(weight, w, keep, perm, float(error.clamp_min(0)))
