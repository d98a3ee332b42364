"""The learned permutation on a model: what it trains on, and how it is judged.

Two scopes (``Learned.scope``):

- ``e2e``: every permutation of the model at once, as in the paper, on the objective of
  :mod:`permsparse.permute.objective` (cross-entropy, KL from the dense model, distance of every block's output
  to the dense model's). The dense model's outputs are recomputed for each batch (the weights are
  frozen, so the dense forward is the same model without the relaxed weights), never held for the
  whole calibration set.
- ``blockwise``: one block at a time against the dense block's outputs, in one block's memory.

Either way the best hard permutations judged on the held-out windows are kept (:mod:`.trainer`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..run import distributed
from ..discover.adapters import AttentionGeometry, is_linear, linear_weight, replaced_weights
from ..sparsity.statistics import batch_arguments, block_output, window_arguments
from ..config import Learned, PruneConfig
from ..data.images import is_classifier
from .objective import DenseStates, Terms, dense_states, hidden_distance, judge_model, model_terms, objective
from ..run.placement import input_device
from ..quant.rtn import fake_quantize
from ..report import TrainingRecord
from ..sparsity.scores import compute_score
from .sites import Site
from .trainer import Deploy, LearnLinear, LearnSite, hard_weight, learn_permutations


# -------------------------------------------------------------------------------------- learning sites
@dataclass
class Plan:
    """One block's target linears, host statistics, permutation sites and their permutations.

    Nothing is pruned yet: learning may replace ``perms`` before the pipeline prunes.
    """

    name: str
    module: nn.Module
    act_norms: dict[str, Tensor | None]
    sites: list[Site]
    perms: dict[str, Tensor | None]
    seconds: dict[str, float]
    grams: dict[str, Tensor] = field(default_factory=dict)  # input Gram matrices, when collected

    def scores(self, linear: str, score: str) -> Tensor:
        """The host score of a linear (block-relative name), from its current weight."""
        return compute_score(score, linear_weight(self.module.get_submodule(linear)), self.act_norms[linear])


def tile_size(width: int, tile: int, m: int) -> int:
    """The largest multiple of ``m`` that divides ``width`` and is at most ``tile`` (``m`` at least)."""
    return max((t for t in range(m, min(tile, width) + 1, m) if width % t == 0), default=width)


def deployed(config: PruneConfig) -> Deploy | None:
    """With ``--quant`` (and ``fake_quant``): a pruned weight as deployed through a permutation, rounded to nearest
    in groups of the permuted order, with a straight-through gradient; else None (the pruned weight itself)."""
    quant = config.quant
    if not quant.enabled or not config.learned.fake_quant:
        return None
    return lambda weight, perm: fake_quantize(weight, quant.kind, quant.group_for(weight.shape[1]), perm)


def learn_sites(plan: Plan, config: PruneConfig, geometry: AttentionGeometry, m: int,
                prefix: str = "") -> tuple[list[LearnSite], dict[str, Tensor]]:
    """The trainable sites of ``plan`` as the trainer takes them (linear names prefixed by ``prefix``),
    and the exact pruned weights of its fixed sites (the global hidden permutation's readers)."""
    learned: Learned = config.learned
    n = config.nm[0]
    sites, fixed = [], {}
    for site in plan.sites:
        linears = {}
        for name in site.linears:
            module = plan.module.get_submodule(name)
            linears[prefix + name] = LearnLinear(linear_weight(module),
                                                 lambda name=name: plan.scores(name, config.host))
        if site.hidden:
            deploy = deployed(config) or (lambda weight, _perm: weight)
            for name, linear in linears.items():
                fixed[name] = deploy(hard_weight(linear, plan.perms[site.name], n, m), plan.perms[site.name])
            continue
        width = next(iter(linears.values())).weight.shape[1]
        base = plan.perms[site.name]
        warm = base is not None
        base = torch.arange(width) if base is None else base
        if site.heads is not None:
            per_kv = site.heads.num_heads // site.heads.num_kv_heads
            tile, tie = site.heads.head_dim, [h // per_kv for h in range(site.heads.num_heads)]
        else:
            tile, tie = tile_size(width, learned.tile, m), None
        sites.append(LearnSite(prefix + site.name, base, tile, linears, tie, warm))
    return sites, fixed


@contextmanager
def _swapped(block: nn.Module, names: list[str], tensors: tuple[Tensor, ...]):
    """``block``'s named linears run with ``tensors`` as their (stored-layout) weights; restored on exit."""
    saved = []
    try:
        for name, tensor in zip(names, tensors):
            module = block.get_submodule(name)
            was_parameter = "weight" in module._parameters
            saved.append((module, module._parameters.pop("weight") if was_parameter else module.__dict__.pop("weight"),
                          was_parameter))
            module.weight = tensor
        yield
    finally:
        for module, old, was_parameter in reversed(saved):
            del module.weight
            if was_parameter:
                module.register_parameter("weight", old)
            else:
                module.weight = old


@contextmanager
def recomputed(blocks: list[nn.Module], enabled: bool):
    """While active (and ``enabled``), each block keeps only its input for the backward pass and runs its
    forward again there: activation checkpointing per block. The replaced (relaxed) weights a block runs
    with are inputs of its checkpoint, so the recomputation uses them, and their gradient flows back."""
    if not enabled:
        yield
        return
    patched = []
    for block in blocks:
        def wrapped(*args, _forward=block.forward, _block=block, **kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            names = [n for n, mod in _block.named_modules() if is_linear(mod) and not isinstance(mod.weight, nn.Parameter)]
            tensors = [_block.get_submodule(n).weight for n in names]

            def run(hidden, *weights):
                with _swapped(_block, names, weights):
                    return _forward(hidden, *args[1:], **kwargs)

            return checkpoint(run, hidden, *tensors, use_reentrant=False)

        patched.append((block, vars(block).get("forward")))
        block.forward = wrapped
    try:
        yield
    finally:
        for block, own in patched:
            del block.forward
            if own is not None:
                block.forward = own


def _schedule(count: int, learned: Learned, seed: int) -> Tensor:
    """The training windows of every step, ``(steps, batch)``, drawn once so a resumed run sees the same."""
    return torch.randint(0, count, (learned.steps, learned.windows_per_step), generator=torch.Generator().manual_seed(seed))


def learn_model(model: nn.Module, plans: list[Plan], windows: Tensor, holdout: Tensor, config: PruneConfig,
                geometry: AttentionGeometry, *, progress: bool = True, labels: tuple[Tensor, Tensor] | None = None,
                state: dict | None = None, save_state=None) -> tuple[dict[str, dict[str, Tensor]], TrainingRecord]:
    """``e2e``: learn every trainable site of every block at once; returns permutations per block name.
    ``labels``: the class labels of ``windows`` and ``holdout`` (an image classifier's cross-entropy)."""
    learned = objective(model, config.learned)
    n, m = config.nm
    sites, fixed, owners = [], {}, []
    for plan in plans:
        block_sites, block_fixed = learn_sites(plan, config, geometry, m, prefix=f"{plan.name}.")
        sites += block_sites
        fixed.update(block_fixed)
        owners += [(plan.name, site.name[len(plan.name) + 1:]) for site in block_sites]
    device = input_device(model)
    windows, holdout = windows.to(device), holdout.to(device)
    schedule = _schedule(windows.shape[0], learned, config.calibration.seed).to(device)

    blocks = [plan.module for plan in plans]

    if learned.windows_per_step < distributed.world():
        raise ValueError(f"{distributed.world()} processes share each step's windows: --batch must be at least that")

    train_labels, holdout_labels = (None, None) if labels is None else (part.to(device) for part in labels)
    if is_classifier(model) and learned.ce > 0 and labels is None:
        raise ValueError(f"{type(model).__name__}: the cross-entropy needs the labels of the calibration images "
                         "(give labels, or --ce 0)")

    def loss_fn(weights: dict[str, Tensor], step: int) -> Tensor:
        ids = distributed.shard(windows[schedule[step]])  # this process's share of the step's batch
        batch_labels = None if train_labels is None else distributed.shard(train_labels[schedule[step]])
        dense = dense_states(model, ids, learned)
        with replaced_weights(model, {**fixed, **weights}), recomputed(blocks, learned.recompute):
            return model_terms(model, ids, learned, dense, batch_labels).global_loss(learned)

    holdout_dense: list[DenseStates] = []  # the dense model's states on the held-out windows, computed once

    def judge_fn(weights: dict[str, Tensor]) -> float:
        return judge_model(model, model, holdout, learned, learned.windows_per_step, {**fixed, **weights},
                           holdout_labels, holdout_dense)

    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # no gradient is computed or kept for any model weight
        p.requires_grad_(False)
    try:
        perms, record = learn_permutations(sites, loss_fn, judge_fn, n, m, learned,
                                           seed=config.calibration.seed, label="learn permutations (e2e)",
                                           progress=progress, state=state, save_state=save_state,
                                           deploy=deployed(config))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    record.scope = "model"
    out: dict[str, dict[str, Tensor]] = {}
    for site, (block, name) in zip(sites, owners):
        out.setdefault(block, {})[name] = perms[site.name]
    return out, record


@dataclass
class BlockData:
    """A block's calibration inputs and the dense block's outputs on them, for training and judging."""

    inputs: Tensor
    targets: Tensor
    holdout_inputs: Tensor
    holdout_targets: Tensor
    kwargs: dict
    holdout_kwargs: dict | None = None  # the held-out windows' own, where arguments differ by window


def learn_block(plan: Plan, data: BlockData, config: PruneConfig, geometry: AttentionGeometry, *,
                progress: bool = False) -> tuple[dict[str, Tensor], TrainingRecord]:
    """``blockwise``: learn the block's trainable sites so the pruned block reproduces the dense outputs.

    With several processes each holds the windows ``rank, rank + world, ...`` (its share of the
    pipeline's windows): a step's batch is drawn over all of them and each process computes its part.
    """
    learned: Learned = config.learned
    n, m = config.nm
    block = plan.module
    sites, fixed = learn_sites(plan, config, geometry, m)
    total = int(distributed.sum_(torch.tensor(float(data.inputs.shape[0]), dtype=torch.float64)))
    schedule = _schedule(total, learned, config.calibration.seed)

    def terms(weights: dict[str, Tensor], inputs: Tensor, targets: Tensor, kwargs: dict) -> tuple[Tensor, Tensor]:
        with replaced_weights(block, {**fixed, **weights}):
            out = block_output(block(inputs, **batch_arguments(kwargs, len(inputs))))
        return hidden_distance(learned.hidden_loss, out, targets)

    def loss_fn(weights: dict[str, Tensor], step: int) -> Tensor:
        batch = schedule[step]
        mine = batch[batch % distributed.world() == distributed.rank()] // distributed.world()
        if len(mine):
            num, den = terms(weights, data.inputs[mine], data.targets[mine], window_arguments(data.kwargs, mine))
        else:  # none of the step's windows is this process's: its share of the gradient is zero
            num = sum((w * 0).sum() for w in weights.values())
            den = torch.zeros((), device=num.device)
        return Terms(hidden_num=num[None], hidden_den=den[None]).global_loss(replace(learned, ce=0.0, kl=0.0, hidden=1.0))

    def judge_fn(weights: dict[str, Tensor]) -> float:
        sums = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for i in range(0, data.holdout_inputs.shape[0], learned.windows_per_step):
                part = slice(i, i + learned.windows_per_step)
                held = data.kwargs if data.holdout_kwargs is None else data.holdout_kwargs
                a, b = terms(weights, data.holdout_inputs[part], data.holdout_targets[part], window_arguments(held, part))
                sums += torch.tensor([float(a), float(b)], dtype=torch.float64)
        num, den = distributed.sum_(sums).tolist()
        return num / max(den, 1e-12)

    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            perms, record = learn_permutations(sites, loss_fn, judge_fn, n, m, learned, seed=config.calibration.seed,
                                               label=f"learn {plan.name}", progress=progress, deploy=deployed(config))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    record.scope = plan.name
    return perms, record
