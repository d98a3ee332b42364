"""Distillation of the kept weights: after pruning, the pruned model trains towards the dense model.

Every pruned linear's kept weights train with AdamW while its mask stays fixed: the forward pass runs
each linear with ``W * mask``, so a pruned weight gets no gradient and stays zero, and the N:M pattern
holds after every step. The dense model is the same module run with the pruned linears' dense weights
(kept aside before pruning), so no second model is loaded. Each step reads its own batch of windows;
at the start, every ``judge_every`` steps and at the end the model is judged on the held-out windows
(the objective of :mod:`permsparse.permute.objective`) and the best judged weights are kept, so distillation
never returns a model judged worse than the pruned one it started from.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch
from torch import Tensor, nn

from ..run import distributed
from ..discover.adapters import linear_weight, replaced_weights
from ..config import Distill
from .following_masks import FollowingMasks
from ..permute.objective import DenseStates, dense_states, judge_model, model_terms, objective
from ..run.placement import input_device
from ..run.progress import bar
from ..report import DistillRecord


@torch.no_grad()
def dense_weights(model: nn.Module, names: list[str]) -> dict[str, Tensor]:
    """Copies of the named linears' ``(out, in)`` weights, taken before pruning: the teacher's."""
    return {name: linear_weight(model.get_submodule(name)).detach().clone() for name in names}


def learning_rate(config: Distill, step: int) -> float:
    """Linear warm-up over the first twentieth of the steps, then cosine decay to zero at the last."""
    warmup = max(1, config.steps // 20)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(config.steps - warmup, 1)))


def batches(windows: Tensor, config: Distill, seed: int) -> Tensor:
    """Indices into ``windows`` of every step's batch, ``(steps, batch)``: each window once, in order, when
    there are enough of them (fresh windows drawn for distillation); otherwise a seeded draw with
    replacement (windows given by the caller, or images)."""
    if len(windows) >= config.windows:
        return torch.arange(config.windows).reshape(config.steps, config.batch)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(windows), (config.steps, config.batch), generator=generator)


def distill(model: nn.Module, dense: dict[str, Tensor], windows: Tensor, holdout: Tensor, config: Distill, *,
            seed: int = 0, labels: tuple[Tensor | None, Tensor | None] = (None, None), progress: bool = True,
            state: dict | None = None, save_state: Callable[[dict], None] | None = None,
            following: FollowingMasks | None = None) -> DistillRecord:
    """Train the kept weights of the pruned linears named in ``dense`` (their dense weights) towards the
    dense model on ``windows``, judged on ``holdout``; the best judged weights are left in ``model``.

    ``labels`` are the class labels of ``windows`` and ``holdout`` (an image classifier's cross-entropy).
    ``state`` resumes from what ``save_state`` last received (at every judgment): weights, optimiser,
    best weights and history, so an interrupted run continues to the same result. With several
    processes each step's batch is split across them and their gradients are summed. ``following``
    (``config.masks`` other than ``fixed``) chooses the masks from the weights as they train
    (:mod:`permsparse.train.following_masks`); its ``kept`` then holds the permutations of the weights left in ``model``.
    """
    weights = objective(model, config)
    if config.batch < distributed.world():
        raise ValueError(f"{distributed.world()} processes share each distillation step: --distill-batch must be at "
                         "least that")
    if (following is None) != (config.masks == "fixed"):
        raise ValueError(f"--distill-masks {config.masks} needs the masks' permutations and statistics (and fixed "
                         "masks none)")
    device = input_device(model)
    names = list(dense)
    modules = [model.get_submodule(name) for name in names]
    params = [module.weight for module in modules]
    masks = [linear_weight(module) != 0 for module in modules]
    windows, holdout = windows.to(device), holdout.to(device)
    train_labels, holdout_labels = (None if part is None else part.to(device) for part in labels)
    schedule = batches(windows, config, seed)
    phase = config.judge_every  # ``alternate``: steps of each phase

    def forward_weights(step: int, permutations_train: bool) -> dict[str, Tensor]:
        if following is not None:
            return following.forward_weights(step, config.steps, permutations_train)
        return {name: linear_weight(module) * mask for name, module, mask in zip(names, modules, masks)}

    def pruned() -> dict[str, Tensor]:
        """The exact pruned weights (the model's own with fixed masks, whose pruned entries stay zero)."""
        return {} if following is None else following.hard()

    teacher: list[DenseStates] = []  # the dense model's states on this process's held-out windows
    with replaced_weights(model, dense):
        mine = distributed.shard(holdout)
        for i in range(0, len(mine), config.batch):
            teacher.append(dense_states(model, mine[i:i + config.batch], weights))

    def judge() -> float:
        return judge_model(model, model, holdout, weights, config.batch, pruned(), labels=holdout_labels,
                           cache=teacher)

    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    tiles = [] if following is None else following.parameters()
    groups = [{"params": params, "lr": config.lr}] + ([{"params": tiles, "lr": config.perm_lr}] if tiles else [])
    optimiser = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0)
    record = DistillRecord([], [], 0.0, 0, 0.0)
    best: tuple[float, int, list[Tensor], list[Tensor] | None] | None = None
    first = 0
    if state is not None:
        with torch.no_grad():
            for p, saved in zip(params + tiles, state["weights"] + state.get("costs", [])):
                p.copy_(saved)
        optimiser.load_state_dict(state["optimiser"])
        record, best, first = copy.deepcopy(state["record"]), state["best"], state["step"]
    started = time.perf_counter() - record.seconds

    def judged(step: int) -> None:
        nonlocal best
        value = judge()
        record.judged.append((step, value))
        if best is None or value < best[0]:
            perms = None if following is None else [p.cpu() for p in following.permutations()]
            exact = pruned()
            kept = [exact.get(name, linear_weight(module)).detach().cpu().clone() for name, module in zip(names, modules)]
            best = (value, step, kept, perms)

    try:
        if state is None:
            judged(0)  # the pruned model as pruning left it
        steps = bar(range(first, config.steps), initial=first, total=config.steps, desc="distil kept weights",
                    disable=not progress, leave=False)
        for step in steps:
            rows = schedule[step]
            ids = distributed.shard(windows[rows])
            batch_labels = None if train_labels is None else distributed.shard(train_labels[rows])
            weights_train, permutations_train = (True, False) if following is None else following.trains(step, phase)
            with replaced_weights(model, dense):
                target = dense_states(model, ids, weights)
            with torch.enable_grad(), replaced_weights(model, forward_weights(step, permutations_train)):
                loss = model_terms(model, ids, weights, target, batch_labels).global_loss(weights)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            for p, trains in [(p, weights_train) for p in params] + [(c, permutations_train) for c in tiles]:
                if not trains:
                    p.grad = None  # a frozen part of the phase: AdamW skips it
                elif p.grad is not None:  # with several processes: every rank's share of the gradient, summed
                    distributed.sum_(p.grad)
            optimiser.param_groups[0]["lr"] = learning_rate(config, step)
            optimiser.step()
            if following is None:
                with torch.no_grad():
                    for module, mask in zip(modules, masks):
                        linear_weight(module).mul_(mask)
            record.loss.append(loss.item())
            steps.set_postfix(loss=f"{loss.item():.4g}", best=f"{best[0]:.4g}")
            done = step + 1
            if done % config.judge_every == 0 or done == config.steps:
                judged(done)
                if save_state is not None and done < config.steps:
                    record.seconds = time.perf_counter() - started
                    save_state(copy.deepcopy({"weights": [p.detach().cpu() for p in params],
                                              "costs": [c.detach().cpu() for c in tiles],
                                              "optimiser": optimiser.state_dict(), "record": record, "best": best,
                                              "step": done}))
        steps.close()
    finally:
        for p in params:
            p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
    assert best is not None
    with torch.no_grad():
        for module, kept in zip(modules, best[2]):
            linear_weight(module).copy_(kept)
        out = sum(int((mask & (kept == 0).to(mask.device)).sum()) for mask, kept in zip(masks, best[2]))
        record.moved = out / max(sum(int(mask.sum()) for mask in masks), 1)
    if following is not None:
        following.kept = best[3]
    record.best_judged, record.best_step = best[0], best[1]
    record.seconds = time.perf_counter() - started
    return record
