"""Training learned permutations: the loop that every learned scope (e2e, blockwise) shares.

The caller gives sites to learn, a differentiable loss of the sites' effective weights and a judge.
Only the cost tiles train (AdamW). Every ``judge_every`` steps, at step 0 (the warm start) and after the
last step, the current hard permutations are judged on exact hard weights; the best judged set is
returned, so the result is never worse than the start on that judgment. A naive learner that trusts
its last step drifts to worse permutations (docs/method.md, "The learned permutation"); keeping the
best judged set, and a warm start that is sharp at the starting temperature, are what make it safe.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..run import distributed
from ..config import Learned
from ..run.progress import bar
from ..sparsity.masks import nm_mask, permuted_nm_mask
from ..report import TrainingRecord
from .sinkhorn import CostTiles, hard_permutations, relaxed_weight, soft_permutations, warm_cost


@dataclass
class LearnLinear:
    """One linear of a site: its weight ``(out, in)`` in the original column order (a reference to the
    model's, never a copy) and a function giving its host scores (recomputed when needed, not held)."""

    weight: Tensor
    scores: Callable[[], Tensor]


@dataclass
class LearnSite:
    """Linears whose inputs share one learned permutation, refined from ``base`` within tiles."""

    name: str
    base: Tensor
    tile: int
    linears: dict[str, LearnLinear]
    tie: list[int] | None = None
    warm: bool = True


def hard_weight(linear: LearnLinear, perm: Tensor, n: int, m: int) -> Tensor:
    """The exact pruned weight of ``linear`` under the full permutation ``perm``: ``W * mask``."""
    with torch.no_grad():
        return linear.weight * permuted_nm_mask(linear.scores(), perm, n, m).to(linear.weight.dtype)


def warm_starts(sites: list[LearnSite], config: Learned, seed: int) -> dict[int, Tensor]:
    """The warm-start costs of every warm site (by index), made in one batch per tile size."""
    out: dict[int, Tensor] = {}
    for tile in sorted({site.tile for site in sites if site.warm}):
        members = [k for k, site in enumerate(sites) if site.warm and site.tile == tile]
        counts = [(max(sites[k].tie) + 1) if sites[k].tie else sites[k].base.numel() // tile for k in members]
        local = torch.arange(tile).repeat(sum(counts), 1)
        costs = warm_cost(local, config.eps_start, config.warm_sharpness, torch.Generator().manual_seed(seed + tile))
        out.update(zip(members, costs.split(counts)))
    return out


Loss = Callable[[dict[str, Tensor], int], Tensor]
Judge = Callable[[dict[str, Tensor]], float]
Deploy = Callable[[Tensor, Tensor], Tensor]  # (pruned weight, permutation) -> the weight as deployed


def learn_permutations(sites: list[LearnSite], loss_fn: Loss, judge_fn: Judge, n: int, m: int, config: Learned, *,
                       seed: int = 0, label: str = "learn permutations", progress: bool = True,
                       state: dict | None = None, save_state: Callable[[dict], None] | None = None,
                       save_every: int = 5, deploy: Deploy | None = None) -> tuple[dict[str, Tensor], TrainingRecord]:
    """Train one :class:`CostTiles` per site; return the best judged full permutations and the record.

    ``loss_fn(weights, step)`` gets the effective weight of every linear of every site (original column
    order, differentiable) and the step (so its batch is a function of the step); ``judge_fn(weights)``
    gets exact hard weights and must be deterministic (an unchanged set is not judged again).
    ``state`` resumes from what ``save_state`` last received (every ``save_every`` steps): costs,
    optimiser, best set and history, so an interrupted run continues to the same result.
    ``deploy(weight, perm)``, when given, turns every pruned weight (judged and trained) into the weight as
    deployed through permutation ``perm`` (the fake-quantized weight of a quantized run, straight through).
    """
    deploy = deploy or (lambda weight, _perm: weight)
    names = [name for site in sites for name in site.linears]
    if len(set(names)) != len(names) or len({s.name for s in sites}) != len(sites):
        raise ValueError("site names and linear names must be unique")
    device = next(iter(sites[0].linears.values())).weight.device
    warm = warm_starts(sites, config, seed)
    modules = [CostTiles(site.base.numel(), site.tile, m, tie=site.tie, warm=site.warm, eps_start=config.eps_start,
                         warm_sharpness=config.warm_sharpness, seed=seed + k, cost=warm.get(k)).to(device)
               for k, site in enumerate(sites)]
    bases = [site.base.to(device) for site in sites]
    optimiser = torch.optim.AdamW([mod.cost for mod in modules], lr=config.lr, weight_decay=0.0)
    record = TrainingRecord(label, [], [], [], 0.0, 0.0, 0, 0.0)
    best: tuple[float, int, list[Tensor]] | None = None
    first_step = 0
    if state is not None:
        for mod, cost in zip(modules, state["costs"]):
            mod.cost.data.copy_(cost)
        optimiser.load_state_dict(state["optimiser"])
        record, best, first_step = copy.deepcopy(state["record"]), state["best"], state["step"]
    last_judged: list[Tensor] | None = None if state is None else state["last_judged"]
    start = time.perf_counter() - record.seconds

    def full(locals_: list[Tensor]) -> list[Tensor]:
        return [base[mod.hard(loc)] for mod, base, loc in zip(modules, bases, locals_)]

    masks: dict[str, tuple[Tensor, Tensor]] = {}  # linear -> (permutation, its N:M mask in final position order)

    def final_mask(name: str, linear: LearnLinear, perm: Tensor) -> Tensor:
        """The mask of ``scores[:, perm]``, chosen again only when the permutation changed."""
        cached = masks.get(name)
        if cached is None or not torch.equal(cached[0], perm):
            with torch.no_grad():
                cached = masks[name] = (perm, nm_mask(linear.scores()[:, perm], n, m))
        return cached[1]

    def hard(name: str, linear: LearnLinear, perm: Tensor) -> Tensor:
        """The exact pruned weight under ``perm`` (see :func:`hard_weight`), from the cached mask."""
        keep = torch.empty_like(final_mask(name, linear, perm))
        keep[:, perm] = final_mask(name, linear, perm)
        return linear.weight * keep.to(linear.weight.dtype)

    def judge(step: int, perms: list[Tensor]) -> None:
        nonlocal best, last_judged
        if last_judged is not None and all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(perms, last_judged)):
            return
        with torch.no_grad():
            weights = {name: deploy(hard(name, lin, p), p) for site, p in zip(sites, perms)
                       for name, lin in site.linears.items()}
        value = float(judge_fn(weights))
        last_judged = [p.cpu() for p in perms]
        record.judged.append((step, value))
        if best is None or value < best[0]:
            best = (value, step, last_judged)

    steps = bar(range(first_step, config.steps), initial=first_step, total=config.steps, desc=label,
                disable=not progress, leave=False)
    for step in steps:
        eps = config.eps_at(step)
        locals_ = hard_permutations(modules)
        perms = full(locals_)
        if step % config.judge_every == 0:
            judge(step, perms)
        weights = {}
        softs = soft_permutations(modules, eps, config.sinkhorn_iters)
        for site, mod, base, loc, p, soft in zip(sites, modules, bases, locals_, perms, softs):
            mats = mod.matrices(eps, config.sinkhorn_iters, config.forward, loc, soft)
            one_hot = loc[mod.tie] if config.forward == "hard" else None  # where the forward pass gathers
            for name, lin in site.linears.items():  # the mask in final position order: position j holds p[j]
                weights[name] = deploy(relaxed_weight(lin.weight, final_mask(name, lin, p), mats, base, hard=one_hot), p)
        loss = loss_fn(weights, step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        for mod in modules:  # with several processes: every rank's share of the gradient, summed
            distributed.sum_(mod.cost.grad)
        optimiser.step()
        record.loss.append(loss.item())
        record.eps.append(eps)
        steps.set_postfix(loss=f"{loss.item():.4g}", best=f"{best[0]:.4g}", eps=f"{eps:.3g}")
        if save_state is not None and (step + 1) % save_every == 0 and step + 1 < config.steps:
            record.seconds = time.perf_counter() - start
            save_state(copy.deepcopy({"costs": [mod.cost.detach().cpu() for mod in modules],
                                      "optimiser": optimiser.state_dict(), "record": record, "best": best,
                                      "last_judged": last_judged, "step": step + 1}))
    judge(config.steps, full(hard_permutations(modules)))
    steps.close()
    assert best is not None
    record.init_judged = record.judged[0][1]
    record.best_judged, record.best_step = best[0], best[1]
    record.seconds = time.perf_counter() - start
    return {site.name: p for site, p in zip(sites, best[2])}, record

