"""Learned input-channel permutations for N:M pruning (the paper's method, §3 of docs/method.md).

Each permutation *site* (linears whose input columns share one permutation) owns free cost matrices
``C``; ``C[i, j]`` is the cost of sending input channel ``i`` to position ``j``. A soft permutation
is the log-domain Sinkhorn normalisation of ``-C / eps``; the hard one is the Hungarian solution of
``C``. The N:M mask is chosen on the permuted host score, the pruned permuted weight is permuted
back, and a caller-supplied loss of those effective weights trains ``C``.

Convention: a permutation ``p`` (LongTensor) means the permuted layer is ``W[:, p]`` – position
``j`` holds original channel ``p[j]``. Its matrix ``P`` has ``P[p[j], j] = 1`` so that ``W @ P``
equals ``W[:, p]``. Channels are split into ``G`` contiguous blocks of ``block_size``; permutations
never cross a block boundary (``P`` is block diagonal and is never built densely), and a ``tie`` list
lets several blocks share one cost matrix (query heads that read the same kv head).

Lessons from a naive version (§8) shape the trainer: the best *hard* permutation seen, judged on the
caller's true objective, is kept and returned, so the result is never worse than the warm start;
and a warm start is made sharp at the starting temperature, so the soft permutation the gradient is
taken at actually resembles the hard one in use.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Literal, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from tqdm.auto import tqdm

from .masks import nm_mask, permuted_nm_mask

Mode = Literal["soft", "ste", "hard"]
Relax = Literal["mask", "weight"]


def log_sinkhorn(log_alpha: Tensor, iters: int) -> Tensor:
    """Log-domain Sinkhorn normalisation of a batch ``(B, b, b)``: returns ``log P``.

    Rows and columns are normalised alternately with ``logsumexp`` (stable at small temperatures,
    where ``exp`` of the raw scores would overflow). It ends with the column step, so columns sum
    to one exactly and rows to within the convergence of ``iters`` rounds.
    """
    for _ in range(iters):
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-1, keepdim=True)
        log_alpha = log_alpha - torch.logsumexp(log_alpha, dim=-2, keepdim=True)
    return log_alpha


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


def hard_masked_weight(weight: Tensor, scores: Tensor, p: Tensor, n: int, m: int) -> Tensor:
    """Exact effective weight of permutation ``p``: ``W * unpermute(nm_mask(S[:, p]))``."""
    return weight * permuted_nm_mask(scores, p, n, m).to(weight.dtype)


def relaxed_weight(
    weight: Tensor,
    scores: Tensor,
    P: Tensor,
    n: int,
    m: int,
    relax: Relax = "mask",
    perm: Tensor | None = None,
) -> Tensor:
    """Effective weight in original column order for block-diagonal ``P`` given as ``(G, b, b)``.

    Both relaxations equal :func:`hard_masked_weight` bit for bit when ``P`` is exactly one-hot
    (every product then sums one weight and zeros); they differ in the gradient they give ``P``.

    - ``"weight"`` (the paper's form): ``((W P) ⊙ nm_mask(S P)) P^T``. It is quadratic in ``P``, so
      at a hard ``P`` the first-order effect of moving channel ``i`` towards slot ``j`` is the
      *mixing* of two weight columns, not the change of which weights survive; measured here, its
      gradient did no better than random search.
    - ``"mask"``: ``W ⊙ (M P^T)`` with ``M = nm_mask(S[:, perm])`` chosen at the hard permutation
      ``perm`` (required). Linear in ``P``: ``dL/dP[i, j]`` is exactly the first-order change of the
      loss if channel ``i`` took slot ``j``'s keep pattern – the same linearised assignment that
      per-slot Hungarian heuristics solve, but on the caller's loss. Measured better (see tests).

    Products are batched per block (``einsum`` over ``(out, G, b)`` and ``(G, b, b)``); a global
    ``width x width`` matrix is never formed for ``G > 1``. The mask carries no gradient.
    """
    out, width = weight.shape
    groups, b, _ = P.shape
    if groups * b != width:
        raise ValueError(f"permutation covers {groups}x{b} channels, weight has {width}")
    Pw = P.to(weight.dtype)
    if relax == "mask":
        if perm is None:
            raise ValueError("relax='mask' needs the hard permutation `perm` the mask is chosen at")
        with torch.no_grad():
            mask = nm_mask(scores[:, perm], n, m).reshape(out, groups, b).to(weight.dtype)
        keep = torch.einsum("ogj,gij->ogi", mask, Pw).reshape(out, width)
        return weight * keep
    if relax != "weight":
        raise ValueError(f"relax must be 'mask' or 'weight', got {relax!r}")
    wp = torch.einsum("ogi,gij->ogj", weight.reshape(out, groups, b), Pw)
    with torch.no_grad():
        sp = torch.einsum("ogi,gij->ogj", scores.reshape(out, groups, b).to(P.dtype), P.detach())
        mask = nm_mask(sp.reshape(out, width), n, m).reshape(out, groups, b)
    return torch.einsum("ogj,gij->ogi", wp * mask.to(wp.dtype), Pw).reshape(out, width)


def _standardise(cost: Tensor) -> Tensor:
    """Scale each block to zero mean and unit std.

    Sinkhorn and Hungarian only see the normalised cost, so the temperature ``eps`` means the same
    thing whatever the raw parameter's scale (weight decay or large steps cannot silently sharpen
    or flatten the soft permutation), and the learning rate reads in units of a block's spread.
    """
    mean = cost.mean(dim=(-2, -1), keepdim=True)
    std = cost.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return (cost - mean) / std


def _warm_cost(local: Tensor, eps: float, sharpness: float, generator: torch.Generator) -> Tensor:
    """Normalised costs ``(T, b, b)`` whose Hungarian solution is ``local`` and that are sharp at ``eps``.

    Off-target entries are uniform in [0, 1); the target entry of each row is ``-delta``. Every
    target is then the strict minimum of its row and column, so the assignment is exactly
    ``local`` for any ``delta > 0``. ``delta`` is bisected so that the soft permutation at ``eps``
    puts about ``sharpness`` of each row's mass on its target (the row-softmax estimate, which is
    what Sinkhorn converges to for a near-permutation). A unit margin at eps 0.5 would leave a
    576-wide soft permutation almost uniform (§8), and the gradient would then be taken far from the
    hard permutation actually used. Blocks too small to reach the requested sharpness after
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

    def log_off_mass(delta: float) -> float:
        total, total_sq = s1 - b * delta, s2 + b * delta**2
        std = ((total_sq - total**2 / count) / (count - 1)).sqrt().reshape(T, 1, 1)
        return torch.logsumexp(-(off + delta) / (std * eps), dim=-1).mean().item()

    lo, hi = 1e-4, 1e4
    if log_off_mass(hi) <= want:  # else the block is too small to be that sharp: take the sharpest
        for _ in range(30):  # brackets a factor 1e8 down to ~2% of delta: plenty for a sharpness target
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if log_off_mass(mid) > want else (lo, mid)
    warm = torch.where(target, torch.full_like(background, -hi), background)
    return _standardise(warm).to(torch.float32)


class LearnedPermutation(nn.Module):
    """Learnable block-diagonal permutation of one site's ``width`` input channels.

    ``cost`` has shape ``(T, b, b)``, one block per distinct tie id; block ``g`` of the site uses
    ``cost[tie[g]]``. With ``init_perm`` the costs start at that permutation (warm start), sharp at
    ``eps_start``; otherwise they are standard normal draws from ``seed``.
    """

    def __init__(
        self,
        width: int,
        block_size: int,
        m: int,
        *,
        tie: Sequence[int] | None = None,
        init_perm: Tensor | None = None,
        eps_start: float = 0.5,
        warm_sharpness: float = 0.9,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if block_size <= 0 or width % block_size:
            raise ValueError(f"width {width} is not a multiple of block_size {block_size}")
        if block_size % m:
            raise ValueError(f"block_size {block_size} is not a multiple of M={m}")
        groups = width // block_size
        tie_list = list(range(groups)) if tie is None else [int(t) for t in tie]
        if len(tie_list) != groups:
            raise ValueError(f"tie has {len(tie_list)} entries, site has {groups} blocks")
        n_ids = max(tie_list) + 1
        if sorted(set(tie_list)) != list(range(n_ids)):
            raise ValueError(f"tie ids must be 0..T-1 with none unused, got {tie_list}")
        self.width, self.block_size, self.groups = width, block_size, groups
        self.register_buffer("tie", torch.tensor(tie_list, dtype=torch.long), persistent=False)
        self.register_buffer(
            "offsets", torch.arange(groups, dtype=torch.long).unsqueeze(1) * block_size, persistent=False
        )
        generator = torch.Generator().manual_seed(seed)
        if init_perm is None:
            cost = _standardise(torch.randn(n_ids, block_size, block_size, generator=generator))
        else:
            local = self._local_from_perm(init_perm, tie_list, n_ids)
            cost = _warm_cost(local, eps_start, warm_sharpness, generator)
        self.cost = nn.Parameter(cost)

    def _local_from_perm(self, perm: Tensor, tie: list[int], n_ids: int) -> Tensor:
        """Split a full-width permutation into per-tie-id local permutations, checking it fits."""
        perm = torch.as_tensor(perm, dtype=torch.long).cpu()
        if perm.shape != (self.width,) or not torch.equal(perm.sort().values, torch.arange(self.width)):
            raise ValueError(f"init_perm is not a permutation of {self.width} channels")
        local = perm.reshape(self.groups, self.block_size) - self.offsets.cpu()
        if ((local < 0) | (local >= self.block_size)).any():
            raise ValueError("init_perm moves channels across block boundaries")
        first = {}
        for g, t in enumerate(tie):
            if t in first and not torch.equal(local[first[t]], local[g]):
                raise ValueError(f"init_perm differs between blocks {first[t]} and {g}, tied together")
            first.setdefault(t, g)
        return torch.stack([local[first[t]] for t in range(n_ids)])

    def normalised_cost(self) -> Tensor:
        """The cost blocks ``(T, b, b)`` the solvers see (zero mean, unit std per block)."""
        return _standardise(self.cost)

    def hard_local(self) -> Tensor:
        """Hungarian solution per tie id, ``(T, b)`` local indices."""
        return hungarian(self.normalised_cost())

    def hard(self, local: Tensor | None = None) -> Tensor:
        """Full-width permutation ``p`` (block offsets added), from ``local`` or a fresh Hungarian solve."""
        local = self.hard_local() if local is None else local
        return (local[self.tie] + self.offsets).reshape(-1)

    def soft(self, eps: float, iters: int) -> Tensor:
        """Soft permutation matrices ``(T, b, b)``: Sinkhorn of ``-C / eps``."""
        return log_sinkhorn(-self.normalised_cost() / eps, iters).exp()

    def matrices(self, eps: float, iters: int, mode: Mode, local: Tensor | None = None) -> Tensor:
        """Per-block matrices ``(G, b, b)`` to use in the forward pass.

        ``soft``: the Sinkhorn matrix. ``ste``: the Hungarian one-hot in value with the Sinkhorn
        gradient; written as ``hard + (soft - soft.detach())`` so the bracket is exactly zero and
        the value is exactly one-hot. ``hard``: the one-hot, no gradient. ``local`` (Hungarian
        result) may be passed in to avoid solving twice.
        """
        if mode == "soft":
            mats = self.soft(eps, iters)
        elif mode in ("ste", "hard"):
            local = self.hard_local() if local is None else local
            mats = perm_matrix(local, self.cost.dtype)
            if mode == "ste":
                soft = self.soft(eps, iters)
                mats = mats + (soft - soft.detach())
        else:
            raise ValueError(f"mode must be 'soft', 'ste' or 'hard', got {mode!r}")
        return mats[self.tie]

    def masked_weight(
        self,
        weight: Tensor,
        scores: Tensor,
        n: int,
        m: int,
        eps: float,
        mode: Mode,
        iters: int = 20,
        relax: Relax = "mask",
    ) -> Tensor:
        """Effective pruned weight in original column order, differentiable w.r.t. the cost.

        ``hard`` is exact and gradient-free (gathers); ``soft`` and ``ste`` go through
        :func:`relaxed_weight` with :meth:`matrices` (see there for ``relax``).
        """
        local = self.hard_local() if (mode != "soft" or relax == "mask") else None
        if mode == "hard":
            with torch.no_grad():
                return hard_masked_weight(weight, scores, self.hard(local), n, m)
        perm = None if local is None else self.hard(local)
        return relaxed_weight(weight, scores, self.matrices(eps, iters, mode, local), n, m, relax, perm)


@dataclass
class LearnConfig:
    """Trainer settings. Defaults are starting points, to be tuned by measurement.

    ``eps`` anneals geometrically from ``eps_start`` to ``eps_end`` (temperature of the normalised
    cost); ``warm_sharpness`` is the share of each row's soft mass on the warm-start permutation at
    ``eps_start``. ``eval_every`` is how often (in steps) the hard permutation is judged with the
    true objective; the best judged one is returned.
    """

    steps: int = 30
    lr: float = 0.1
    weight_decay: float = 0.0
    eps_start: float = 0.5
    eps_end: float = 0.05
    sinkhorn_iters: int = 20
    mode: Literal["ste", "soft"] = "ste"
    relax: Relax = "mask"
    eval_every: int = 5
    warm_sharpness: float = 0.9
    seed: int = 0

    def eps_at(self, step: int) -> float:
        """Geometric annealing: ``eps_start`` at step 0, ``eps_end`` at the last step."""
        frac = step / max(self.steps - 1, 1)
        return self.eps_start * (self.eps_end / self.eps_start) ** frac


@dataclass
class SiteSpec:
    """One permutation site: linears (name -> (weight, host score)) sharing one input permutation."""

    name: str
    linears: dict[str, tuple[Tensor, Tensor]]
    block_size: int
    tie: list[int] | None = None
    init_perm: Tensor | None = None

    @property
    def width(self) -> int:
        """Input width shared by every linear of the site."""
        widths = {w.shape[-1] for w, _ in self.linears.values()}
        if len(widths) != 1:
            raise ValueError(f"site {self.name}: linears have different input widths {sorted(widths)}")
        return widths.pop()


def learn_permutations(
    sites: list[SiteSpec],
    loss_fn: Callable[[dict[str, Tensor]], Tensor],
    n: int,
    m: int,
    config: LearnConfig,
    *,
    eval_fn: Callable[[dict[str, Tensor]], Tensor] | None = None,
    progress: bool = True,
) -> tuple[dict[str, Tensor], dict]:
    """Train one :class:`LearnedPermutation` per site on ``loss_fn``; return the best hard permutations.

    ``loss_fn`` gets the effective weight (original column order) of every linear of every site and
    returns a scalar. Only the cost matrices train (AdamW). Every ``eval_every`` steps, at step 0 (the
    warm start) and after the last step, the current hard permutations are judged by ``eval_fn``
    (default ``loss_fn``) on exact hard weights under ``no_grad``; the best judged set is returned, so
    the result is never worse than the start on that judgment. The judge must be deterministic (a
    fixed batch): an unchanged set of permutations is not judged again. Pass a separate ``eval_fn``
    when ``loss_fn`` draws random batches.

    Returns ``(perms, history)``: ``perms`` maps site name to a CPU LongTensor; ``history`` holds
    per-step ``loss`` and ``eps``, ``evals`` as ``(step, value)``, ``init_eval``, ``best_eval``,
    ``best_step``, ``improved`` (best strictly below the start) and ``seconds``.
    """
    if config.mode not in ("ste", "soft"):
        raise ValueError(f"training mode must be 'ste' or 'soft', got {config.mode!r}")
    judge = loss_fn if eval_fn is None else eval_fn
    names = [name for site in sites for name in site.linears]
    if len(set(names)) != len(names) or len({s.name for s in sites}) != len(sites):
        raise ValueError("site names and linear names must be unique")
    device = next(iter(sites[0].linears.values()))[0].device
    modules = [
        LearnedPermutation(
            site.width, site.block_size, m, tie=site.tie, init_perm=site.init_perm,
            eps_start=config.eps_start, warm_sharpness=config.warm_sharpness, seed=config.seed + k,
        ).to(device)
        for k, site in enumerate(sites)
    ]
    frozen = [{k: (w.detach(), s.detach()) for k, (w, s) in site.linears.items()} for site in sites]
    optimiser = torch.optim.AdamW(
        [mod.cost for mod in modules], lr=config.lr, weight_decay=config.weight_decay
    )

    def judge_perms(perms: list[Tensor]) -> float:
        with torch.no_grad():
            weights = {
                name: hard_masked_weight(w, s, p, n, m)
                for p, lin in zip(perms, frozen) for name, (w, s) in lin.items()
            }
            return float(judge(weights))

    history: dict = {"loss": [], "eps": [], "evals": []}
    best: tuple[float, int, list[Tensor]] | None = None
    last_judged: list[Tensor] | None = None
    start = time.perf_counter()

    def maybe_judge(step: int, locals_: list[Tensor]) -> None:
        nonlocal best, last_judged
        perms = [mod.hard(loc) for mod, loc in zip(modules, locals_)]
        if last_judged is not None and all(torch.equal(a, b) for a, b in zip(perms, last_judged)):
            return
        value = judge_perms(perms)
        last_judged = perms
        history["evals"].append((step, value))
        if best is None or value < best[0]:
            best = (value, step, [p.cpu() for p in perms])

    need_hard = config.mode == "ste" or config.relax == "mask"
    bar = tqdm(range(config.steps), disable=not progress, desc="learn permutations")
    for step in bar:
        eps = config.eps_at(step)
        judge_now = step % config.eval_every == 0
        locals_ = [mod.hard_local() if need_hard or judge_now else None for mod in modules]
        if judge_now:
            maybe_judge(step, locals_)
        weights = {}
        for mod, lin, loc in zip(modules, frozen, locals_):
            mats = mod.matrices(eps, config.sinkhorn_iters, config.mode, loc)
            perm = None if loc is None else mod.hard(loc)
            for name, (w, s) in lin.items():
                weights[name] = relaxed_weight(w, s, mats, n, m, config.relax, perm)
        loss = loss_fn(weights)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        history["loss"].append(loss.item())
        history["eps"].append(eps)
        bar.set_postfix(loss=f"{loss.item():.4g}", best=f"{best[0]:.4g}")
    maybe_judge(config.steps, [mod.hard_local() for mod in modules])
    bar.close()

    assert best is not None
    history["init_eval"] = history["evals"][0][1]
    history["best_eval"], history["best_step"] = best[0], best[1]
    history["improved"] = best[0] < history["init_eval"]
    history["seconds"] = time.perf_counter() - start
    return {site.name: p for site, p in zip(sites, best[2])}, history
