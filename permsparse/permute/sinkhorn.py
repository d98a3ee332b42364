"""Differentiable permutations: log-domain Sinkhorn, the Hungarian solution, and learnable cost tiles.

A site's channels (in the order of its warm start, the "base" order) are cut into tiles of ``tile``
channels; each tile owns a free cost matrix ``C`` where ``C[i, j]`` is the cost of sending channel
``i`` to position ``j``. The soft permutation is the log-domain Sinkhorn normalisation of ``-C / eps``;
the hard one is the Hungarian solution of ``C``. Permutations never cross a tile (``P`` is block
diagonal and never built densely); a ``tie`` list lets several tiles share one cost matrix (the query
heads that read one kv head).

Convention: a permutation ``q`` means position ``j`` holds channel ``q[j]``; its matrix ``P`` has
``P[q[j], j] = 1``, so ``x @ P == x[..., q]``.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from .assignment import linear_sum_assignment


def log_sinkhorn(log_alpha: Tensor, iters: int) -> Tensor:
    """Log-domain Sinkhorn normalisation of a batch ``(B, b, b)``: returns ``log P``, without a gradient
    (:func:`sinkhorn_matrices` is the differentiable form).

    Rows and columns are normalised alternately with ``logsumexp`` (stable at small temperatures,
    where ``exp`` of the raw scores would overflow). It ends with the column step, so columns sum
    to one exactly and rows to within the convergence of ``iters`` rounds.
    """
    return _sinkhorn_steps(log_alpha, iters)[0]


@torch.no_grad()
def _sinkhorn_steps(log_alpha: Tensor, iters: int) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """:func:`log_sinkhorn`, with the row and the column normaliser subtracted at every iteration. The
    iterate is updated in place and every ``logsumexp`` reuses one buffer (the same arithmetic as
    ``torch.logsumexp``, without allocating the whole batch again per operation)."""
    x, rows, cols = log_alpha.clone(), [], []
    buffer = torch.empty_like(x)
    for _ in range(iters):
        rows.append(_logsumexp(x, -1, buffer))
        x.sub_(rows[-1])
        cols.append(_logsumexp(x, -2, buffer))
        x.sub_(cols[-1])
    return x, rows, cols


def _logsumexp(x: Tensor, dim: int, buffer: Tensor) -> Tensor:
    """``torch.logsumexp(x, dim, keepdim=True)``, step for step as ATen computes it, in ``buffer``."""
    top = x.amax(dim, keepdim=True)
    top.masked_fill_(top.abs() == math.inf, 0)
    return torch.sub(x, top, out=buffer).exp_().sum(dim, keepdim=True).log_().add_(top)


def hungarian(cost: Tensor) -> Tensor:
    """Batched min-cost assignment: for ``cost`` ``(B, b, b)`` return ``p`` ``(B, b)``.

    ``cost[k, i, j]`` is the cost of channel ``i`` at position ``j``; ``p[k, j]`` is the channel
    placed at position ``j`` (the module's convention), so the solver runs on the transpose, whose
    rows are positions. Solved in float64 on the CPU, without gradient.
    """
    c = cost.detach().to("cpu", torch.float64).transpose(-1, -2).numpy()
    perms = [linear_sum_assignment(block)[1] for block in c]
    return torch.from_numpy(np.stack(perms)).to(device=cost.device, dtype=torch.long)


def perm_matrix(local: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """One-hot matrices ``(B, b, b)`` with ``P[k, local[k, j], j] = 1``, so ``x @ P == x[..., p]``."""
    batch, b = local.shape
    eye = torch.zeros(batch, b, b, dtype=dtype, device=local.device)
    return eye.scatter_(1, local.unsqueeze(1), 1.0)


def standardise(cost: Tensor) -> Tensor:
    """Scale each block to zero mean and unit std.

    Sinkhorn and Hungarian only see the normalised cost, so the temperature ``eps`` means the same
    thing whatever the raw parameter's scale (weight decay or large steps cannot silently sharpen
    or flatten the soft permutation), and the learning rate reads in units of a block's spread.
    """
    mean = cost.mean(dim=(-2, -1), keepdim=True)
    std = cost.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return (cost - mean) / std


def warm_cost(local: Tensor, eps: float, sharpness: float, generator: torch.Generator) -> Tensor:
    """Normalised costs ``(T, b, b)`` whose Hungarian solution is ``local`` and that are sharp at ``eps``.

    Off-target entries are uniform in [0, 1); the target entry of each row is ``-delta``. Every
    target is then the strict minimum of its row and column, so the assignment is exactly
    ``local`` for any ``delta > 0``. ``delta`` is bisected, for every tile at once, so that the soft
    permutation at ``eps`` puts about ``sharpness`` of each row's mass on its target (the row-softmax
    estimate, which is what Sinkhorn converges to for a near-permutation). A unit margin at eps 0.5
    would leave a 576-wide soft permutation almost uniform, and the gradient would then be taken far
    from the hard permutation actually used. Tiles too small to reach the requested sharpness after
    normalisation get the sharpest warm start possible.
    """
    T, b = local.shape
    background = torch.rand(T, b, b, generator=generator, dtype=torch.float64)
    target = perm_matrix(local.cpu(), torch.float64).bool()
    want = math.log((1.0 - sharpness) / sharpness)  # log(off-target mass / target mass) per row
    # Mean and std of the matrix are closed-form in delta, so each bisection step costs one
    # logsumexp: after normalisation the gap of an off-target entry is (background + delta) / std.
    off = background.masked_fill(target, math.inf)
    count = b * b
    s1 = background.masked_fill(target, 0.0).sum(dim=(-2, -1))
    s2 = background.masked_fill(target, 0.0).pow(2).sum(dim=(-2, -1))

    def log_off_mass(delta: Tensor) -> Tensor:
        total, total_sq = s1 - b * delta, s2 + b * delta**2
        std = ((total_sq - total**2 / count) / (count - 1)).sqrt().reshape(T, 1, 1)
        return torch.logsumexp(-(off + delta.reshape(T, 1, 1)) / (std * eps), dim=-1).mean(dim=-1)

    lo, hi = torch.full((T,), 1e-4, dtype=torch.float64), torch.full((T,), 1e4, dtype=torch.float64)
    reachable = log_off_mass(hi) <= want  # else the tile is too small to be that sharp: take the sharpest
    for _ in range(30):  # brackets a factor 1e8 down to ~2% of delta: plenty for a sharpness target
        mid = (lo * hi).sqrt()
        blunt = log_off_mass(mid) > want
        lo, hi = torch.where(blunt & reachable, mid, lo), torch.where(~blunt & reachable, mid, hi)
    warm = torch.where(target, -hi.reshape(T, 1, 1).expand_as(background), background)
    return standardise(warm).to(torch.float32)


class CostTiles(nn.Module):
    """Learnable block-diagonal permutation of one site's ``width`` channels, in tiles of ``tile``.

    ``cost`` has shape ``(T, tile, tile)``, one matrix per distinct tie id; tile ``g`` uses
    ``cost[tie[g]]``. A warm start begins at the identity of the base order, sharp at ``eps_start``;
    otherwise the costs are standard normal draws from ``seed``.
    """

    def __init__(self, width: int, tile: int, m: int, *, tie: list[int] | None = None, warm: bool = True,
                 eps_start: float = 0.5, warm_sharpness: float = 0.9, seed: int = 0,
                 cost: Tensor | None = None) -> None:
        super().__init__()
        if tile <= 0 or width % tile:
            raise ValueError(f"width {width} is not a multiple of the tile {tile}")
        if tile % m:
            raise ValueError(f"tile {tile} is not a multiple of M={m}")
        tiles = width // tile
        tie = list(range(tiles)) if tie is None else [int(t) for t in tie]
        if len(tie) != tiles or sorted(set(tie)) != list(range(max(tie) + 1)):
            raise ValueError(f"tie must give each of the {tiles} tiles an id in 0..T-1, none unused; got {tie}")
        self.width, self.tile = width, tile
        self.register_buffer("tie", torch.tensor(tie, dtype=torch.long), persistent=False)
        self.register_buffer("offsets", torch.arange(tiles, dtype=torch.long).unsqueeze(1) * tile, persistent=False)
        generator = torch.Generator().manual_seed(seed)
        ids = max(tie) + 1
        if cost is not None:  # made for many sites at once (:func:`warm_costs`)
            if cost.shape != (ids, tile, tile):
                raise ValueError(f"cost has shape {tuple(cost.shape)}, the site needs {(ids, tile, tile)}")
        elif warm:
            cost = warm_cost(torch.arange(tile).repeat(ids, 1), eps_start, warm_sharpness, generator)
        else:
            cost = standardise(torch.randn(ids, tile, tile, generator=generator))
        self.cost = nn.Parameter(cost)

    def normalised_cost(self) -> Tensor:
        """The cost tiles ``(T, tile, tile)`` the solvers see (zero mean, unit std per tile)."""
        return standardise(self.cost)

    def hard_local(self) -> Tensor:
        """Hungarian solution per tie id, ``(T, tile)`` local indices."""
        return hungarian(self.normalised_cost())

    def hard(self, local: Tensor | None = None) -> Tensor:
        """The full-width permutation (tile offsets added), from ``local`` or a fresh Hungarian solve."""
        local = self.hard_local() if local is None else local
        return (local[self.tie] + self.offsets).reshape(-1)

    def soft(self, eps: float, iters: int) -> Tensor:
        """Soft permutation matrices ``(T, tile, tile)``: Sinkhorn of ``-C / eps``."""
        return soft_permutations([self], eps, iters)[0]

    def matrices(self, eps: float, iters: int, forward: str, local: Tensor, soft: Tensor | None = None) -> Tensor:
        """Per-tile matrices ``(G, tile, tile)`` for the training forward pass.

        ``soft``: the Sinkhorn matrix. ``hard``: the Hungarian one-hot (``local``) in value with the
        Sinkhorn gradient, written ``hard + (soft - soft.detach())`` so the bracket is exactly zero.
        ``soft`` may be given when :func:`soft_permutations` computed it for many sites at once.
        """
        soft = self.soft(eps, iters) if soft is None else soft
        if forward == "soft":
            mats = soft
        elif forward == "hard":
            mats = perm_matrix(local, soft.dtype) + (soft - soft.detach())
        else:
            raise ValueError(f"forward must be 'hard' or 'soft', got {forward!r}")
        return mats[self.tie]


class _Sinkhorn(torch.autograd.Function):
    """``exp(log_sinkhorn(log_alpha, iters))`` with an exact backward that stores no iterate.

    Every iterate is ``log_alpha`` minus the row and column normalisers subtracted so far, so the
    forward keeps only those vectors (``2 * iters`` of ``(B, b)``) and the backward rebuilds each
    iterate with one addition. The backward of ``y = x - logsumexp(x)`` along a dimension is
    ``g - exp(y) * sum(g)`` along it: one exponential per step, and no second forward pass.
    """

    @staticmethod
    def forward(ctx, log_alpha: Tensor, iters: int) -> Tensor:
        x, rows, cols = _sinkhorn_steps(log_alpha, iters)
        ctx.save_for_backward(log_alpha, *rows, *cols)
        ctx.iters = iters
        return x.exp()

    @staticmethod
    def backward(ctx, grad: Tensor):
        log_alpha, *norms = ctx.saved_tensors
        rows, cols = norms[:ctx.iters], norms[ctx.iters:]
        z = log_alpha - sum(rows) - sum(cols)  # the last iterate, then each earlier one, in place
        e = z.exp()
        g = grad * e
        product = torch.empty_like(g)
        for k, (r, c) in enumerate(zip(reversed(rows), reversed(cols))):
            g.sub_(torch.mul(e, g.sum(dim=-2, keepdim=True), out=product))  # through the column step
            torch.exp(z.add_(c), out=e)
            g.sub_(torch.mul(e, g.sum(dim=-1, keepdim=True), out=product))  # through the row step
            if k + 1 < ctx.iters:
                torch.exp(z.add_(r), out=e)
        return g, None


def sinkhorn_matrices(cost: Tensor, eps: float, iters: int) -> Tensor:
    """Soft permutation matrices of raw costs ``(B, b, b)``: Sinkhorn of the standardised ``-C / eps``."""
    return _Sinkhorn.apply(-standardise(cost) / eps, iters)


def soft_permutations(tiles: list[CostTiles], eps: float, iters: int) -> list[Tensor]:
    """Every site's soft permutation matrices, with one Sinkhorn per tile size for all sites at once.

    Each tile is normalised on its own, so batching changes nothing but the number of (small)
    operations. The backward holds no Sinkhorn iterate (:class:`_Sinkhorn`): stored, they would be
    ``2 * iters`` copies of every cost tile for the whole training step.
    """
    out: list[Tensor | None] = [None] * len(tiles)
    for size in sorted({t.tile for t in tiles}):
        members = [i for i, t in enumerate(tiles) if t.tile == size]
        costs = torch.cat([tiles[i].cost for i in members])
        soft = sinkhorn_matrices(costs, eps, iters)
        for i, part in zip(members, soft.split([tiles[i].cost.shape[0] for i in members])):
            out[i] = part
    return out


def hard_permutations(tiles: list[CostTiles]) -> list[Tensor]:
    """Every site's Hungarian solution ``(T, tile)``, solved in one batch per tile size."""
    out: list[Tensor | None] = [None] * len(tiles)
    for size in sorted({t.tile for t in tiles}):
        members = [i for i, t in enumerate(tiles) if t.tile == size]
        with torch.no_grad():
            local = hungarian(torch.cat([tiles[i].normalised_cost() for i in members]))
        for i, part in zip(members, local.split([tiles[i].cost.shape[0] for i in members])):
            out[i] = part
    return out


class _RelaxedWeight(torch.autograd.Function):
    """``W * unbase(einsum(mask, P))``: the effective weight of a relaxed permutation, lean in memory.

    ``mask`` (bool, ``(out, width)``) is the N:M mask in the learner's final position order, chosen at
    the hard permutation; ``P`` (``(G, tile, tile)``) maps base-order channels to positions. The keep
    pattern in base order is ``keep[o, g, i] = sum_j mask[o, g, j] P[g, i, j]``: linear in ``P``, so
    ``dL/dP[g, i, j]`` is exactly the first-order change of the loss if channel ``i`` took position
    ``j``'s keep pattern. Only the weight (a reference), the bool mask and the base order are saved.
    With ``straight_through`` the weight gets the gradient of the product as if every entry were kept
    (distillation whose masks follow the weights, :mod:`permsparse.train.following_masks`). With ``hard`` (each tile's
    local permutation, ``(G, tile)``, at which ``P`` is one-hot in value, as the hard forward pass makes it)
    the keep pattern is a gather instead of the product: the same values, without the forward pass's
    ``out * width * tile`` multiplications.
    """

    @staticmethod
    def forward(ctx, matrices: Tensor, weight: Tensor, mask: Tensor, base: Tensor, straight_through: bool,
                hard: Tensor | None) -> Tensor:
        out, width = weight.shape
        tiles, tile, _ = matrices.shape
        grouped = mask.view(out, tiles, tile)
        if hard is None:
            keep = torch.einsum("ogj,gij->ogi", grouped.to(matrices.dtype), matrices)
        else:  # P[g, i, j] = 1 where hard[g, j] = i: channel i keeps position j's pattern
            keep = grouped.gather(2, torch.argsort(hard, dim=-1).expand(out, -1, -1))
        unbased = torch.empty_like(weight)  # the keep pattern in the original column order
        unbased[:, base] = keep.reshape(out, width).to(weight.dtype)
        ctx.save_for_backward(weight, mask, base)
        ctx.tiles, ctx.straight_through = (tiles, tile, matrices.dtype), straight_through
        return weight * unbased

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, mask, base = ctx.saved_tensors
        tiles, tile, dtype = ctx.tiles
        g = (grad * weight)[:, base].reshape(weight.shape[0], tiles, tile).to(dtype)
        weight_grad = grad if ctx.straight_through else None
        return torch.einsum("ogi,ogj->gij", g, mask.view(g.shape).to(dtype)), weight_grad, None, None, None, None


def relaxed_weight(weight: Tensor, mask: Tensor, matrices: Tensor, base: Tensor, straight_through: bool = False,
                   hard: Tensor | None = None) -> Tensor:
    """Effective weight (original column order) of ``weight`` under per-tile matrices ``matrices``.

    ``weight`` is ``(out, width)`` in the original order, ``base`` the base order (original channel
    at each base position), ``mask`` the N:M mask in final position order (see
    :class:`_RelaxedWeight`). At a one-hot ``matrices`` it equals ``weight * permuted_nm_mask``
    exactly: every product sums one weight and zeros. ``hard``: the tiles' local permutations where
    ``matrices`` are one-hot in value (the hard forward pass), so the forward pass gathers.
    """
    if matrices.shape[0] * matrices.shape[1] != weight.shape[1]:
        raise ValueError(f"permutation covers {matrices.shape[0]}x{matrices.shape[1]} channels, "
                         f"weight has {weight.shape[1]}")
    return _RelaxedWeight.apply(matrices, weight, mask, base, straight_through, hard)
