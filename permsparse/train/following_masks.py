"""The masks of the kept weights while they train: fixed, or following the weights through a permutation.

Distillation (:mod:`permsparse.train.distill`) trains every pruned linear's weights towards the dense model.
With ``fixed`` masks each linear keeps the mask pruning chose and only its kept weights train. The other
modes let the mask follow the weights, as sparse training does (SR-STE, Zhou et al., ICLR 2021), so the
groups are chosen for the weights they end up holding:

- ``dynamic``: every step the N:M mask is chosen again from the current weights, by the host score on
  the pruning's input statistics, through each site's permutation (unstructured: the top share of each
  row). The forward pass uses ``W * mask``; the backward pass gives every weight the gradient of the
  masked weight (straight through), so a pruned weight whose gradient makes it grow can win its group
  back. The pruned entries start at zero, as pruning left them: the first masks are the host's own
  (a weight-updating host's too), and a weight enters a group only by growing into it. (Reviving the
  pruned entries at their dense values instead made the masks churn: 33.87 against 32.19 Alpaca
  validation ppl after 30 steps of ``dynamic`` on SmolLM2-135M, docs/results.md.)
- ``joint``: ``dynamic``, with each site's permutation learned along: the cost tiles of the learned
  permutation (:mod:`permsparse.permute.sinkhorn`) start at the pruning's permutation and train with
  the weights, the mask chosen through the current hard permutation and its gradient reaching the tiles
  through the Sinkhorn relaxation (:func:`relaxed_weight`).
- ``alternate``: phases of ``judge_every`` steps, the permutation alone on the current weights (the
  learned permutation's step, weights frozen), then the weights alone through that permutation
  (``dynamic``), and so on.

The exact pruned weights (:meth:`FollowingMasks.hard`) are what is judged and what the model keeps at
the end; the permutations that chose them replace the report's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..discover import linear_weight
from ..sparsity.masks import permuted_nm_mask, unstructured_mask
from ..permute.sinkhorn import CostTiles, hard_permutations, relaxed_weight, soft_permutations
from ..sparsity.scores import compute_score

MODES = ("fixed", "dynamic", "joint", "alternate")


@dataclass
class FollowingSite:
    """Linears (full names) whose masks follow their weights through one permutation: ``perm`` (the
    pruning's), learned within tiles of ``tile`` channels (tied as in :class:`CostTiles`) when the mode
    learns permutations and the site is ``learnable`` (a reader of a global hidden permutation is not)."""

    name: str
    linears: tuple[str, ...]
    perm: Tensor
    tile: int
    tie: list[int] | None = None
    learnable: bool = True


class _StraightThrough(torch.autograd.Function):
    """``weight * mask`` forward; the gradient of the product reaches every weight, pruned ones too."""

    @staticmethod
    def forward(ctx, weight: Tensor, mask: Tensor) -> Tensor:
        return weight * mask.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class FollowingMasks:
    """Masks chosen every step from the current weights (see the module docstring).

    ``modules`` are the pruned linears by full name (their weights train in place), ``act_norms`` their
    inputs' norms from the pruning's statistics, ``host`` the score, ``nm`` the pattern (None: unstructured
    at ``density``), ``sites`` the permutations.
    """

    def __init__(self, mode: str, modules: dict[str, nn.Module], act_norms: dict[str, Tensor | None], host: str,
                 nm: tuple[int, int] | None, density: float, sites: list[FollowingSite], *, eps: tuple[float, float],
                 sinkhorn_iters: int, warm_sharpness: float, seed: int):
        if mode not in MODES[1:]:
            raise ValueError(f"unknown mask mode {mode!r}; one of {', '.join(MODES[1:])}")
        if mode != "dynamic" and nm is None:
            raise ValueError(f"--distill-masks {mode} learns permutations, which only N:M patterns have")
        self.mode, self.modules, self.act_norms, self.host = mode, modules, act_norms, host
        self.nm, self.density, self.sites = nm, density, sites
        self.eps, self.sinkhorn_iters = eps, sinkhorn_iters
        device = next(iter(modules.values())).weight.device
        self.bases = [site.perm.to(device) for site in sites]
        self.learning = [] if mode == "dynamic" else [k for k, site in enumerate(sites) if site.learnable]
        self.tiles = [CostTiles(sites[k].perm.numel(), sites[k].tile, nm[1], tie=sites[k].tie, eps_start=eps[0],
                                warm_sharpness=warm_sharpness, seed=seed + k).to(device) for k in self.learning]
        self.site_of = {name: k for k, site in enumerate(sites) for name in site.linears}
        self.kept: list[Tensor] | None = None  # the permutations of the weights distillation kept (set at its end)

    def weight(self, name: str) -> Tensor:
        """The linear's trainable ``(out, in)`` weight (a view of its parameter, made when asked for, so it
        carries the parameter's gradient)."""
        return linear_weight(self.modules[name])

    def parameters(self) -> list[Tensor]:
        """The cost tiles that train (none in ``dynamic``)."""
        return [tiles.cost for tiles in self.tiles]

    def trains(self, step: int, phase: int) -> tuple[bool, bool]:
        """Whether the weights and the permutations train at ``step`` (``alternate``: phases of ``phase``
        steps, the permutations first)."""
        if self.mode == "dynamic":
            return True, False
        if self.mode == "joint":
            return True, True
        permutations_phase = (step // phase) % 2 == 0
        return not permutations_phase, permutations_phase

    def eps_at(self, step: int, steps: int) -> float:
        """The Sinkhorn temperature: geometric from the first to the last step, as the learned permutation's."""
        start, end = self.eps
        return start * (end / start) ** (step / max(steps - 1, 1))

    def permutations(self, locals_: list[Tensor] | None = None) -> list[Tensor]:
        """Each site's current hard permutation (from the tiles' Hungarian solutions ``locals_``, solved
        here when not given)."""
        perms = list(self.bases)
        if locals_ is None:
            locals_ = hard_permutations(self.tiles) if self.tiles else []
        for k, tiles, local in zip(self.learning, self.tiles, locals_):
            perms[k] = self.bases[k][tiles.hard(local)]
        return perms

    @torch.no_grad()
    def _scores(self, name: str) -> Tensor:
        return compute_score(self.host, self.weight(name), self.act_norms[name])

    @torch.no_grad()
    def masks(self, perms: list[Tensor]) -> dict[str, Tensor]:
        """Every linear's mask of its current weight through its site's permutation in ``perms``."""
        return {name: unstructured_mask(self._scores(name), self.density) if self.nm is None
                else permuted_nm_mask(self._scores(name), perms[self.site_of[name]], *self.nm)
                for name in self.modules}

    def forward_weights(self, step: int, steps: int, permutations_train: bool) -> dict[str, Tensor]:
        """The weights the forward pass runs with: masked from the current weights, differentiable in the
        weights (straight through) and, while the permutations train, in the cost tiles."""
        locals_ = hard_permutations(self.tiles) if self.tiles else []
        perms = self.permutations(locals_)
        masks = self.masks(perms)
        out = {name: _StraightThrough.apply(self.weight(name), mask) for name, mask in masks.items()}
        if not permutations_train:
            return out
        eps = self.eps_at(step, steps)
        softs = soft_permutations(self.tiles, eps, self.sinkhorn_iters)
        for k, tiles, local, soft in zip(self.learning, self.tiles, locals_, softs):
            matrices = tiles.matrices(eps, self.sinkhorn_iters, "hard", local, soft)
            for name in self.sites[k].linears:  # the mask in the order of the permuted columns, as the relaxation reads it
                out[name] = relaxed_weight(self.weight(name), masks[name][:, perms[k]], matrices, self.bases[k],
                                           straight_through=True, hard=local[tiles.tie])
        return out

    @torch.no_grad()
    def hard(self, perms: list[Tensor] | None = None) -> dict[str, Tensor]:
        """The exact pruned weights: every weight times its mask through ``perms`` (the current hard
        permutations by default)."""
        masks = self.masks(self.permutations() if perms is None else perms)
        return {name: self.weight(name) * mask.to(self.weight(name).dtype) for name, mask in masks.items()}
