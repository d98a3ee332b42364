"""The learned permutation on a model: what it trains on, and the objective it is judged by.

Two scopes (``Learned.scope``):

- ``e2e``: every permutation of the model at once, as in the paper. The objective is
  ``ce * CE + kl * KL + hidden * mean_l dist(h_l, h_l^dense)``: the pruned model's next-token
  cross-entropy on the calibration windows, the KL divergence of its next-token distributions from the
  dense model's, and the distance of every block's output to the dense model's. The dense
  model's outputs are recomputed for each batch (the weights are frozen, so the dense forward is the
  same model without the relaxed weights), never held for the whole calibration set, and the
  cross-entropy is taken in chunks of positions, never as full-vocabulary logits of a whole batch.
- ``blockwise``: one block at a time against the dense block's outputs, in one block's memory.

An image classifier's cross-entropy is that of its class logits on the labels of the calibration images,
and its KL that of its class distribution from the dense model's. A model without either head (an
encoder) has no output distribution: its ``e2e`` objective is the hidden distillation alone
(:func:`objective`).

Either way the best hard permutations judged on the held-out windows are kept (:mod:`.trainer`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import distributed
from ..adapters import AttentionGeometry, is_linear, linear_weight, replaced_weights
from ..calibration import block_output
from ..config import Learned, PruneConfig
from ..discover import model_inputs
from ..evaluation import next_token_kl, next_token_nll
from ..images import is_classifier
from ..report import TrainingRecord
from ..scores import compute_score
from .sites import Site
from .trainer import LearnLinear, LearnSite, hard_weight, learn_permutations

# ------------------------------------------------------------------------------------------ objective
@dataclass
class Terms:
    """Sums that make up the objective over some windows; terms of disjoint batches add up, so the
    judgment over many windows is computed batch by batch and equals the one over all at once."""

    nll: Tensor = field(default_factory=lambda: torch.zeros(()))
    tokens: int = 0
    kl: Tensor = field(default_factory=lambda: torch.zeros(()))
    positions: int = 0
    hidden_num: Tensor = field(default_factory=lambda: torch.zeros(()))
    hidden_den: Tensor = field(default_factory=lambda: torch.zeros(()))

    def __add__(self, other: "Terms") -> "Terms":
        return Terms(self.nll + other.nll, self.tokens + other.tokens, self.kl + other.kl,
                     self.positions + other.positions, self.hidden_num + other.hidden_num,
                     self.hidden_den + other.hidden_den)

    def reduced(self) -> "Terms":
        """The terms summed over every process's windows (detached): those of the global batch."""
        sums = [distributed.sum_(t.detach().double().clone()) for t in (self.nll, self.kl, self.hidden_num,
                                                                           self.hidden_den)]
        counts = distributed.sum_(torch.tensor([self.tokens, self.positions], dtype=torch.float64))
        return Terms(sums[0], int(counts[0]), sums[1], int(counts[1]), sums[2], sums[3])

    def global_loss(self, learned: Learned) -> Tensor:
        """The loss of the global batch (every process's windows), with a gradient that is this
        process's share: summed over the processes the gradients are the global loss's gradient.

        Each term is a ratio of sums (NLL over tokens, distance over target power), so the share is its
        first-order part, ``d/dnum = 1/den_total`` and ``d/dden = -num_total/den_total^2``; with one
        process this is the loss itself.
        """
        if not distributed.active():
            return self.value(learned)
        total = self.reduced()
        den = total.hidden_den.float().clamp_min(1e-12)
        share = _weighted(learned, lambda: self.nll / max(total.tokens, 1), lambda: self.kl / max(total.positions, 1),
                          lambda: (self.hidden_num / den - total.hidden_num.float() * self.hidden_den / den**2).mean(),
                          self.nll.device)
        return share + (total.value(learned).float() - share).detach()

    def value(self, learned: Learned) -> Tensor:
        return _weighted(learned, lambda: self.nll / max(self.tokens, 1), lambda: self.kl / max(self.positions, 1),
                         lambda: (self.hidden_num / self.hidden_den.clamp_min(1e-12)).mean(), self.nll.device)


def _weighted(learned: Learned, ce, kl, hidden, device) -> Tensor:
    """``ce * CE + kl * KL + hidden * distance``, each term computed (by its function) only if weighted."""
    loss = torch.zeros((), device=device)
    for weight, term in ((learned.ce, ce), (learned.kl, kl), (learned.hidden, hidden)):
        if weight > 0:
            loss = loss + weight * term()
    return loss


def hidden_distance(kind: str, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``(numerator, denominator)`` of the scale-free distance of a block's output to the dense one.

    ``mse``: squared error over the target's power; ``cosine``: mean of ``1 - cos`` over tokens;
    ``smoothl1``: Smooth-L1 of both scaled by the target's mean magnitude, averaged.
    """
    output, target = output.float(), target.float()
    if kind == "mse":
        return (output - target).pow(2).sum(), target.pow(2).sum()
    if kind == "cosine":
        cos = F.cosine_similarity(output, target, dim=-1)
        return (1 - cos).sum(), torch.tensor(float(cos.numel()), device=cos.device)
    if kind == "smoothl1":
        scale = target.abs().mean().clamp_min(1e-12)
        return (F.smooth_l1_loss(output / scale, target / scale, reduction="sum"),
                torch.tensor(float(target.numel()), device=target.device))
    raise ValueError(f"unknown hidden loss {kind!r}")


def objective(model: nn.Module, learned: Learned) -> Learned:
    """The e2e objective weights ``model`` trains on: as configured for a model with an LM head; for one
    without (an encoder) the hidden distillation alone. There the default CE and KL weights are dropped,
    and any other CE or KL weight is refused: both need output distributions. An image classifier's
    objective is as configured, on its class logits."""
    if model.get_output_embeddings() is not None or is_classifier(model):
        return learned
    defaults = {f.name: f.default for f in fields(Learned)}
    kind = type(model).__name__
    if learned.ce not in (0.0, defaults["ce"]) or learned.kl not in (0.0, defaults["kl"]):
        raise ValueError(f"{kind} has no LM head, so no cross-entropy or KL: the e2e objective can only distil "
                         "hidden states (set --ce 0 --kl 0)")
    if learned.hidden <= 0:
        raise ValueError(f"{kind} has no LM head: the e2e objective distils hidden states; "
                         "give --hidden a weight above 0")
    return replace(learned, ce=0.0, kl=0.0)


@dataclass
class DenseStates:
    """What the objective needs of the dense model on a batch: block outputs and final hidden states."""

    blocks: tuple[Tensor, ...] | None
    final: Tensor | None


@torch.no_grad()
def dense_states(teacher: nn.Module, ids: Tensor, learned: Learned) -> DenseStates:
    """The dense model's outputs on ``ids`` that the objective distils towards (None where unused): block
    outputs, and the final hidden states (an image classifier: its class logits)."""
    if learned.hidden <= 0 and learned.kl <= 0:
        return DenseStates(None, None)
    if is_classifier(teacher):
        out = teacher(**model_inputs(teacher, ids), output_hidden_states=learned.hidden > 0)
        return DenseStates(out.hidden_states[1:] if learned.hidden > 0 else None,
                           out.logits if learned.kl > 0 else None)
    out = teacher.base_model(ids, output_hidden_states=learned.hidden > 0, use_cache=False)
    return DenseStates(out.hidden_states[1:] if learned.hidden > 0 else None,
                       out.last_hidden_state if learned.kl > 0 else None)


def _hidden_terms(terms: Terms, hidden_states, learned: Learned, dense: DenseStates) -> Terms:
    if dense.blocks is not None:
        pairs = [hidden_distance(learned.hidden_loss, h, t) for h, t in zip(hidden_states[1:], dense.blocks)]
        terms.hidden_num = torch.stack([p[0] for p in pairs])
        terms.hidden_den = torch.stack([p[1] for p in pairs])
    return terms


def classifier_terms(student: nn.Module, pixels: Tensor, labels: Tensor | None, learned: Learned,
                     dense: DenseStates) -> Terms:
    """The objective's terms of the image classifier ``student`` on ``pixels``: the cross-entropy of its
    class logits on ``labels``, the KL divergence of its class distribution from the dense model's, and
    the distance of every block's output to the dense model's."""
    out = student(**model_inputs(student, pixels), output_hidden_states=dense.blocks is not None)
    terms = Terms()
    if learned.ce > 0:
        if labels is None:
            raise ValueError(f"{type(student).__name__}: the cross-entropy needs the labels of the calibration images")
        terms.nll = F.cross_entropy(out.logits.float(), labels.to(out.logits.device), reduction="sum")
        terms.tokens = len(labels)
    if dense.final is not None:
        log_p, log_q = F.log_softmax(dense.final.float(), dim=-1), F.log_softmax(out.logits.float(), dim=-1)
        terms.kl = (log_p.exp() * (log_p - log_q)).sum()
        terms.positions = len(pixels)
    return _hidden_terms(terms, out.hidden_states, learned, dense)


def model_terms(student: nn.Module, ids: Tensor, learned: Learned, dense: DenseStates,
                labels: Tensor | None = None) -> Terms:
    """The objective's terms of the causal LM ``student`` on ``ids`` (an image classifier: of
    :func:`classifier_terms` on images and their ``labels``), against the dense model's outputs ``dense``
    (:func:`dense_states`, computed before the student's weights are replaced)."""
    if is_classifier(student):
        return classifier_terms(student, ids, labels, learned, dense)
    out = student.base_model(ids, output_hidden_states=dense.blocks is not None, use_cache=False)
    head = student.get_output_embeddings()
    terms = Terms()
    if learned.ce > 0:
        terms.nll = next_token_nll(head, out.last_hidden_state, ids)
        terms.tokens = ids[:, 1:].numel()
    if dense.final is not None:
        terms.kl = next_token_kl(head, out.last_hidden_state, dense.final)
        terms.positions = ids.numel()
    return _hidden_terms(terms, out.hidden_states, learned, dense)


@torch.no_grad()
def judge_model(student: nn.Module, teacher: nn.Module, windows: Tensor, learned: Learned,
                weights: dict[str, Tensor] | None = None, labels: Tensor | None = None,
                cache: list[DenseStates] | None = None) -> float:
    """The objective of ``student`` (with ``weights`` replaced, if given) against ``teacher`` on
    ``windows`` (the held-out set, with their ``labels`` for an image classifier), batch by batch, each
    process on its share. The two may be one module. ``cache``, if given, keeps the teacher's states of
    each batch after the first call (an empty list to start), so repeated judgments run the teacher once."""
    total = Terms()
    mine = distributed.shard(windows)
    mine_labels = None if labels is None else distributed.shard(labels)
    for batch, i in enumerate(range(0, mine.shape[0], learned.windows_per_step)):
        ids = mine[i:i + learned.windows_per_step]
        batch_labels = None if mine_labels is None else mine_labels[i:i + learned.windows_per_step]
        if cache is not None and batch < len(cache):
            dense = cache[batch]
        else:
            dense = dense_states(teacher, ids, learned)
            if cache is not None:
                cache.append(dense)
        with replaced_weights(student, weights or {}):
            total = total + model_terms(student, ids, learned, dense, batch_labels)
    return float((total.reduced() if distributed.active() else total).value(learned))


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


def _tile(width: int, tile: int, m: int) -> int:
    """The largest multiple of ``m`` that divides ``width`` and is at most ``tile`` (``m`` at least)."""
    return max((t for t in range(m, min(tile, width) + 1, m) if width % t == 0), default=width)


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
            for name, linear in linears.items():
                fixed[name] = hard_weight(linear, plan.perms[site.name], n, m)
            continue
        width = next(iter(linears.values())).weight.shape[1]
        base = plan.perms[site.name]
        warm = base is not None
        base = torch.arange(width) if base is None else base
        if site.heads is not None:
            per_kv = site.heads.num_heads // site.heads.num_kv_heads
            tile, tie = site.heads.head_dim, [h // per_kv for h in range(site.heads.num_heads)]
        else:
            tile, tie = _tile(width, learned.tile, m), None
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
    device = next(model.parameters()).device
    windows, holdout = windows.to(device), holdout.to(device)
    schedule = _schedule(windows.shape[0], learned, config.calibration.seed)

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
        return judge_model(model, model, holdout, learned, {**fixed, **weights}, holdout_labels, holdout_dense)

    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # no gradient is computed or kept for any model weight
        p.requires_grad_(False)
    try:
        perms, record = learn_permutations(sites, loss_fn, judge_fn, n, m, learned,
                                           seed=config.calibration.seed, label="learn permutations (e2e)",
                                           progress=progress, state=state, save_state=save_state)
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

    def terms(weights: dict[str, Tensor], inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        with replaced_weights(block, {**fixed, **weights}):
            out = block_output(block(inputs, **data.kwargs))
        return hidden_distance(learned.hidden_loss, out, targets)

    def loss_fn(weights: dict[str, Tensor], step: int) -> Tensor:
        batch = schedule[step]
        mine = batch[batch % distributed.world() == distributed.rank()] // distributed.world()
        if len(mine):
            num, den = terms(weights, data.inputs[mine], data.targets[mine])
        else:  # none of the step's windows is this process's: its share of the gradient is zero
            num = sum((w * 0).sum() for w in weights.values())
            den = torch.zeros(())
        return Terms(hidden_num=num[None], hidden_den=den[None]).global_loss(replace(learned, ce=0.0, kl=0.0, hidden=1.0))

    def judge_fn(weights: dict[str, Tensor]) -> float:
        sums = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for i in range(0, data.holdout_inputs.shape[0], learned.windows_per_step):
                part = slice(i, i + learned.windows_per_step)
                a, b = terms(weights, data.holdout_inputs[part], data.holdout_targets[part])
                sums += torch.tensor([float(a), float(b)], dtype=torch.float64)
        num, den = distributed.sum_(sums).tolist()
        return num / max(den, 1e-12)

    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            perms, record = learn_permutations(sites, loss_fn, judge_fn, n, m, learned, seed=config.calibration.seed,
                                               label=f"learn {plan.name}", progress=progress)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    record.scope = plan.name
    return perms, record
