"""ADMM pruning with gradual mask selection (Boža 2024, "Fast and Effective Weight Update for Pruned
Large Language Models", arXiv 2401.02938) for one linear layer.

The layer-wise problem ``min ||X W^T - X Ŵ^T||^2`` over ``Ŵ`` with a sparsity pattern is split as
``Ŵ = Z`` with ``Z`` in the sparse set, and solved with the alternating direction method of multipliers:

- ``W <- (W0 H + rho (Z - U)) (H + rho I)^-1``: a ridge regression pulled towards ``Z - U``; the same
  inverse serves every iteration and every row, so one factorisation pays for the whole run;
- ``Z <- project(W + U)``: keep the mask's entries of ``W + U``, zero the rest;
- ``U <- U + W - Z``: the scaled dual variable, accumulating the constraint violation.

The mask is not fixed up front: during the first ``prune_iterations`` iterations it is re-chosen from
``|W + U|`` with the sparsity raised on the cubic schedule ``s_t = s (1 - (1 - (t+1)/k)^3)`` (Zhu & Gupta
2017), so weights are removed while the kept ones already compensate. Everything runs on the
*normalised* problem (input columns scaled so that ``diag(H) = 1``): there ``|W|`` is Wanda's score
``|W_ij| ||X_j||``, one ``rho`` suits every layer, and the solves are better conditioned.
"""
from __future__ import annotations

import torch

from ..sparsity.masks import nm_mask, unstructured_mask
from .common import UpdateResult, check_target, dead_inputs, finish, output_error, to_processing_order


def _gradual_mask(score: torch.Tensor, step: int, steps: int, n: int | None, m: int | None,
                  density: float | None) -> torch.Tensor:
    """The keep-mask at gradual-pruning step ``step`` (0-based) of ``steps``.

    The final step gives the target mask: ``nm_mask(score, n, m)`` or ``unstructured_mask(score,
    density)`` (per row). Earlier steps prune the fraction ``s_t`` of the cubic schedule. For N:M, every
    group's current top ``n`` are protected and the rest are pruned by one threshold over the layer, so the
    pruned set grows into exactly the N:M complement; for unstructured sparsity each row is thresholded.
    """
    if step + 1 >= steps:
        return nm_mask(score, n, m) if n is not None else unstructured_mask(score, density)
    final = 1.0 - (n / m if n is not None else density)
    fraction = final * (1.0 - (1.0 - (step + 1) / steps) ** 3)
    if n is not None:
        candidates = score.masked_fill(nm_mask(score, n, m), torch.inf)
        count = int(round(score.numel() * fraction))
        if count == 0:
            return torch.ones_like(score, dtype=torch.bool)
        return candidates > torch.kthvalue(candidates.flatten(), count).values
    count = int(round(score.shape[1] * fraction))
    if count == 0:
        return torch.ones_like(score, dtype=torch.bool)
    return score > torch.kthvalue(score, count, dim=1, keepdim=True).values


def _masked_cg(x: torch.Tensor, target: torch.Tensor, hessian: torch.Tensor, keep: torch.Tensor,
               steps: int) -> torch.Tensor:
    """Minimise ``sum_r (x_r H x_r^T / 2 - x_r . target_r)`` over ``x`` supported on ``keep``.

    Conjugate gradients, one independent run per row (row ``r`` solves ``H_SS x_S = target_S`` on its
    support ``S``), all rows sharing one matrix product per step. Starting from a feasible ``x``, every
    step lowers each row's objective, so the refinement never undoes ADMM's work; it stops early once all
    residuals have fallen by ``1e-6`` (relative norm).
    """
    zero = x.new_zeros(())
    residual = torch.where(keep, target - x @ hessian, zero)
    direction = residual.clone()
    rr = residual.square().sum(1)
    stop = rr * 1e-12
    for _ in range(steps):
        if bool((rr <= stop).all()):
            break
        product = torch.where(keep, direction @ hessian, zero)
        curvature = (direction * product).sum(1)
        alpha = torch.where(curvature > 0, rr / curvature.clamp_min(torch.finfo(x.dtype).tiny), zero)
        x = x + alpha[:, None] * direction
        residual = residual - alpha[:, None] * product
        rr_next = residual.square().sum(1)
        beta = torch.where(rr > 0, rr_next / rr.clamp_min(torch.finfo(x.dtype).tiny), zero)
        direction = residual + beta[:, None] * direction
        rr = rr_next
    return x


def admm(weight: torch.Tensor, hessian: torch.Tensor, n: int | None = None, m: int | None = None, *,
         density: float | None = None, perm: torch.Tensor | None = None, mask: torch.Tensor | None = None,
         iterations: int = 20, prune_iterations: int = 15, rho: float = 1.0, damp: float = 0.1,
         refine_iterations: int = 10) -> UpdateResult:
    """Prune ``weight`` (``(out, in)``) with ADMM and gradual mask selection; return the updated weight.

    ``hessian`` is ``H = X^T X`` over the calibration tokens, ``(in, in)``. The target is one of:

    - ``n, m``: an N:M pattern in the processing order (groups of ``m`` consecutive columns);
    - ``density``: unstructured sparsity, the final mask keeping ``density`` of every row;
    - ``mask``: a fixed bool keep-mask ``(out, in)`` in the original column order; no selection runs,
      only the weight update. Passing ``n``/``m`` as well checks the mask against the pattern.

    ``perm`` has the same meaning as for :func:`~permsparse.update.sparsegpt.sparsegpt`: the algorithm runs
    on ``W[:, perm]`` and ``H[perm][:, perm]`` and the result returns in the original column order.

    The ADMM defaults follow the paper and its authors' implementation: ``iterations=20`` ADMM
    iterations, the mask raised to the target over the first ``prune_iterations=15`` of them (then held
    fixed, so the last five converge on the final mask), ``rho=1`` and ``damp=0.1``, both relative to the
    normalised ``H`` (unit diagonal). ``damp`` adds ``damp * H_jj`` to each diagonal entry, a ridge towards
    the dense weights that keeps the problem well posed when calibration tokens are few; it is also the
    objective being minimised, so a smaller ``damp`` fits the calibration tokens more closely. Dead inputs
    (zero diagonal) get a unit diagonal and a zero weight, so they are pruned first.

    ADMM's last sparse iterate ``Z`` is then refined on its fixed mask by ``refine_iterations`` steps of
    conjugate gradients towards the exact least-squares weights for that mask (same dampened objective;
    each step costs about one ADMM iteration and never increases that objective). This step is not part
    of the paper; ``refine_iterations=0`` returns ``Z`` as the paper does. The computation runs in float32.
    """
    check_target(weight, n, m, density, mask)
    if iterations < 1 or not 1 <= prune_iterations <= iterations:
        raise ValueError(f"need 1 <= prune_iterations ({prune_iterations}) <= iterations ({iterations})")
    if rho <= 0 or damp < 0:
        raise ValueError(f"rho ({rho}) must be positive and damp ({damp}) non-negative")
    w, h, fixed = to_processing_order(weight, hessian, perm, mask, n, m)
    cols = w.shape[1]

    # Normalise the columns: H_n = S^-1 H S^-1, W_n = W S with S = sqrt(diag(H)) (1 for dead inputs).
    dead = dead_inputs(h)
    scale = torch.where(dead, torch.ones_like(torch.diagonal(h)), torch.diagonal(h).clamp_min(0).sqrt())
    hn = h / scale[:, None] / scale[None, :]
    diag = torch.arange(cols, device=h.device)
    hn[dead, dead] = 1.0
    hn[diag, diag] += damp
    wn = w * scale
    wn[:, dead] = 0.0
    target = wn @ hn
    system = hn.clone()
    system[diag, diag] += rho
    solve = torch.cholesky_inverse(torch.linalg.cholesky(system))
    del system

    keep = fixed if fixed is not None else torch.ones_like(w, dtype=torch.bool)
    x, dual = wn, torch.zeros_like(wn)
    for step in range(iterations):
        shifted = x + dual
        if fixed is None and step < prune_iterations:
            keep = _gradual_mask(shifted.abs(), step, prune_iterations, n, m, density)
        z = torch.where(keep, shifted, shifted.new_zeros(()))
        dual = shifted - z
        x = (target + rho * (z - dual)) @ solve
    z = torch.where(keep, x + dual, x.new_zeros(()))
    if refine_iterations:
        z = _masked_cg(z, target, hn, keep, refine_iterations)
    updated = z / scale
    dense = w  # the weights in processing order as passed in (dead inputs included; H ignores them)
    return finish(weight, updated, keep, perm, output_error(dense - updated, h))
