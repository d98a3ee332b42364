"""One-shot pruning of a whole model, block by block (the SparseGPT/Wanda pipeline).

For each block: collect input statistics of its linears with hooks while the dense block runs, choose
a permutation per site (method.md §4), prune every target linear to N:M on its permuted score, then run
the pruned block to produce the next block's inputs. The pruned weight is stored in the original
column order (``W * unpermute(mask)``), so the model runs unchanged and loads anywhere.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import resource
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import data
from .adapters import Adapter, AttentionGeometry, adapter_for, is_linear, linear_weight
from .calibration import InputStats, capture_block_inputs, collect_drift, collect_input_stats, run_block
from .masks import nm_mask, parse_target, permuted_nm_mask, unstructured_mask
from .permutation import find_permutation, needs_gram, permutation_methods
from .scores import SCORES, compute_score
from .training import learn_block_permutations, learn_model_permutations

BINDINGS = ("per-linear", "shared", "global")
PROPAGATIONS = ("pruned", "dense")
LEARNED = "learned"
LEARN_INITS = ("output", "ria", "cp", "none", "random")
LEARN_LOSSES = ("mse", "smoothl1", "cosine")
LEARN_MODES = ("blockwise", "e2e")


def perm_choices() -> list[str]:
    """Every ``--perm`` value: the searches, and the learned permutation."""
    return [*permutation_methods(), LEARNED]


@dataclass
class PruneConfig:
    """Everything that decides the pruned model; the same config gives the same model.

    ``pattern`` is ``"N:M"`` or an unstructured sparsity such as ``"50%"`` (the reference limit).
    ``include``/``exclude`` are glob patterns on full linear names (``*mlp.down_proj``).
    With ``perm="learned"`` the permutations are trained, refining the ``learn_init`` search's result
    within blocks of ``learn_block`` channels, on mini-batches of ``learn_batch`` windows (default
    :meth:`learn_batch_size`): ``learn_mode="e2e"`` (default) trains all at once on
    ``CE + learn_alpha * distillation`` (``learn_ce=False`` drops CE); ``"blockwise"`` trains each block
    against the dense block's outputs (``learn_loss``), in one block's memory, for models too large for e2e;
    ``learn`` holds :class:`permsparse.learned.LearnConfig` fields (steps, lr, eps_start, ...).
    ``compensate`` (used by ``perm="output"`` with ``propagate="pruned"``; other methods and dense
    propagation have no pruned stream to make up for) makes the search minimise each linear's error
    against the dense model's outputs rather than against its own dense weights on the pruned inputs
    (:func:`permsparse.calibration.collect_drift`), at the price of two more passes of each block (on
    the pruned and on the dense model's hidden states): perplexity 148.66 instead of 160.42 on SmolLM2
    2:4 Wanda (README).
    """

    pattern: str = "2:4"
    score: str = "wanda"
    perm: str = "none"
    binding: str = "per-linear"
    perm_groups: int = 1
    perm_options: dict = field(default_factory=dict)
    calib: str = "wikitext2-valid"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    propagate: str = "pruned"
    compensate: bool = True
    strict: bool = False
    batch_size: int = 8
    learn_mode: str = "e2e"
    learn_init: str = "output"
    learn_loss: str = "mse"
    learn_alpha: float = 1.0
    learn_ce: bool = True
    learn_batch: int | None = None
    learn_block: int = 64
    learn: dict = field(default_factory=dict)

    def learn_batch_size(self) -> int:
        """Windows per training step: ``learn_batch``, else 2 for e2e (each step is a whole model's forward
        and backward) and 4 for blockwise (one block's); the defaults that were measured."""
        if self.learn_batch is not None:
            return self.learn_batch
        return 2 if self.learn_mode == "e2e" else 4

    def target(self) -> tuple[str, float | tuple[int, int]]:
        """``("nm", (n, m))`` or ``("unstructured", density)``, validating the pattern."""
        return parse_target(self.pattern)

    def validate(self) -> None:
        kind, _ = self.target()
        if self.score not in SCORES:
            raise ValueError(f"unknown score {self.score!r}; choose one of {', '.join(SCORES)}")
        methods = perm_choices()
        if self.perm not in methods:
            raise ValueError(f"unknown permutation method {self.perm!r}; choose one of {', '.join(methods)}")
        if kind == "unstructured" and self.perm != "none":
            raise ValueError("permutations only matter for N:M patterns, not unstructured sparsity")
        if self.binding not in BINDINGS:
            raise ValueError(f"unknown binding {self.binding!r}; choose one of {', '.join(BINDINGS)}")
        if self.propagate not in PROPAGATIONS:
            raise ValueError(f"unknown propagation {self.propagate!r}; choose one of {', '.join(PROPAGATIONS)}")
        if self.learn_init not in LEARN_INITS:
            raise ValueError(f"unknown learn_init {self.learn_init!r}; choose one of {', '.join(LEARN_INITS)}")
        if self.learn_mode not in LEARN_MODES:
            raise ValueError(f"unknown learn_mode {self.learn_mode!r}; choose one of {', '.join(LEARN_MODES)}")
        if self.learn_mode == "e2e" and not self.learn_ce and self.learn_alpha <= 0:
            raise ValueError("the e2e objective is empty: keep cross-entropy or give learn_alpha > 0")
        if self.learn_loss not in LEARN_LOSSES:
            raise ValueError(f"unknown learn_loss {self.learn_loss!r}; choose one of {', '.join(LEARN_LOSSES)}")
        if self.nsamples < 1 or self.seqlen < 2:
            raise ValueError("nsamples must be >= 1 and seqlen >= 2")

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class PruneReport:
    """What a run did: per-layer records, the permutations, time and memory."""

    config: dict
    layers: list[dict] = field(default_factory=list)
    permutations: dict[str, list[int]] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    training: dict[str, dict] = field(default_factory=dict)
    hidden_permutation: list[int] | None = None
    seconds: float = 0.0
    peak_rss_mb: float = 0.0


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class BlockData:
    """What learning a block's permutations needs: its inputs, the dense block's outputs, its kwargs."""

    inputs: torch.Tensor
    targets: torch.Tensor
    kwargs: dict


@dataclass(frozen=True)
class Site:
    """Linears whose input columns share one permutation; ``heads`` keeps it within attention heads."""

    name: str
    linears: tuple[str, ...]
    heads: AttentionGeometry | None = None
    hidden: bool = False


def sites_for_group(group: tuple[str, ...], binding: str, adapter: Adapter, geometry: AttentionGeometry) -> list[Site]:
    """Permutation sites of one input group under a binding (method.md §4).

    ``shared``: one permutation per input (q/k/v together, gate/up together); the attention output
    projection's permutation stays within heads and is identical for the query heads of one kv head,
    so it folds into the value rows. ``global``: as shared, but readers of the residual stream all use
    one hidden-dimension permutation of the whole model, so every permutation folds.
    ``per-linear``: every linear has its own, unconstrained.
    """
    if binding == "per-linear":
        return [Site(name, (name,)) for name in group]
    heads = geometry if group == (adapter.attn_output,) else None
    hidden = binding == "global" and all(name in adapter.residual_readers for name in group)
    return [Site("+".join(group), group, heads, hidden)]


def _select_targets(model: nn.Module, adapter: Adapter, config: PruneConfig, m: int | None) -> tuple[list[list[tuple[str, ...]]], list[str]]:
    """Per block, the input groups restricted to target linears; plus skipped layers (with reasons).

    Weights are checked for NaN/Inf here, before any work, so a bad checkpoint fails at once.
    """
    blocks = adapter.blocks(model)
    known = {name for group in adapter.input_groups for name in group}
    per_block, skipped, indivisible = [], [], []
    for i, block in enumerate(blocks):
        prefix = f"{adapter.blocks_path}.{i}."
        extra = tuple((name,) for name, mod in block.named_modules() if is_linear(mod) and name not in known)
        groups = []
        for group in tuple(adapter.input_groups) + extra:
            kept = []
            for name in group:
                full = prefix + name
                if config.include and not any(fnmatch.fnmatch(full, p) for p in config.include):
                    continue
                if any(fnmatch.fnmatch(full, p) for p in config.exclude):
                    continue
                weight = linear_weight(block.get_submodule(name))
                if not torch.isfinite(weight).all():
                    raise FloatingPointError(f"non-finite weights in {full}")
                if m is not None and weight.shape[1] % m:
                    indivisible.append(f"{full} (in_features={weight.shape[1]})")
                    continue
                kept.append(name)
            if kept:
                groups.append(tuple(kept))
        per_block.append(groups)
    if indivisible:
        message = f"in_features not divisible by M={m}: {', '.join(indivisible)}"
        if config.strict:
            raise ValueError(message)
        warnings.warn(f"skipping layers, {message}", stacklevel=3)
        skipped += indivisible
    return per_block, skipped


def _site_permutation(
    site: Site, scores: list[torch.Tensor], weights: list[torch.Tensor], stats: InputStats | None,
    n: int, m: int, config: PruneConfig, method: str,
) -> torch.Tensor | None:
    """Search one site's permutation with ``method``; stacked rows share it (method.md §4).

    ``"random"`` (a start for learning only) returns None: the learner draws its own.
    """
    width = scores[0].shape[1]
    if method == "random":
        return None
    if method == "none":
        return torch.arange(width)
    options = dict(groups=config.perm_groups, seed=config.seed, **config.perm_options)
    gram, drift = (None, None) if stats is None else (stats.gram, stats.drift)
    if site.heads is None:
        return find_permutation(
            torch.cat(scores), n, m, method, weight=torch.cat(weights), gram=gram, drift=drift, **options
        )
    geo, hd = site.heads, site.heads.head_dim
    if hd % m:
        raise ValueError(f"{site.name}: head_dim {hd} is not divisible by M={m}; use --binding per-linear")
    per_kv = geo.num_heads // geo.num_kv_heads
    options["groups"] = 1
    perm = torch.empty(width, dtype=torch.long)
    for kv in range(geo.num_kv_heads):
        heads = range(kv * per_kv, (kv + 1) * per_kv)
        cols = [slice(h * hd, (h + 1) * hd) for h in heads]
        per_head = lambda x: None if x is None else torch.stack([x[c, c] for _ in scores for c in cols])  # noqa: E731
        p = find_permutation(
            torch.cat([s[:, c] for s in scores for c in cols]), n, m, method,
            weight=torch.cat([w[:, c] for w in weights for c in cols]), gram=per_head(gram),
            drift=per_head(drift), **options,
        )
        for h in heads:
            perm[h * hd : (h + 1) * hd] = h * hd + p
    return perm


def apply_permuted_mask(weight: torch.Tensor, scores: torch.Tensor, perm: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Prune ``weight`` in place to N:M on ``scores[:, perm]``; return the mask in original order."""
    mask = permuted_nm_mask(scores, perm, n, m)
    weight.mul_(mask.to(weight.dtype))
    return mask


def _kept_fraction(scores: torch.Tensor, mask: torch.Tensor) -> float:
    return float((scores * mask).sum() / scores.sum().clamp_min(1e-30))


def _learning(config: PruneConfig) -> bool:
    return config.perm == LEARNED


@dataclass
class BlockPlan:
    """One block's target linears, host scores, permutation sites and their (searched) permutations.

    Nothing is pruned yet: learning may replace ``perms`` before :func:`_apply_plan` prunes.
    """

    name: str
    weights: dict[str, torch.Tensor]
    scores: dict[str, torch.Tensor]
    sites: list[Site]
    perms: dict[str, torch.Tensor | None]
    seconds: dict[str, float]

    @property
    def trainable(self) -> list[Site]:
        """Sites a learner may change (not the model-wide hidden permutation of ``global``)."""
        return [site for site in self.sites if not site.hidden]


def _weights_and_scores(block: nn.Module, groups: list[tuple[str, ...]], stats: dict[str, InputStats],
                        config: PruneConfig) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    weights, scores = {}, {}
    for group in groups:
        group_stats = stats.get(group[0])
        act_norm = group_stats.act_norm if group_stats is not None else None
        for name in group:
            weights[name] = linear_weight(block.get_submodule(name))
            scores[name] = compute_score(config.score, weights[name], act_norm)
    return weights, scores


@torch.no_grad()
def _plan_block(
    block: nn.Module, block_name: str, groups: list[tuple[str, ...]], stats: dict[str, InputStats],
    config: PruneConfig, adapter: Adapter, geometry: AttentionGeometry, hidden_perm: torch.Tensor | None,
    starts: dict[str, torch.Tensor | None] | None = None,
) -> BlockPlan:
    """Scores and sites of one block, each site's permutation searched (``learn_init`` when learning),
    or taken from ``starts`` (site name -> permutation) when a resumed run already searched them."""
    n, m = config.target()[1]
    weights, scores = _weights_and_scores(block, groups, stats, config)
    method = config.learn_init if _learning(config) else config.perm
    plan = BlockPlan(block_name, weights, scores, [], {}, {})
    for group in groups:
        group_stats = stats.get(group[0])
        for site in sites_for_group(group, config.binding, adapter, geometry):
            plan.sites.append(site)
            start = time.perf_counter()
            if site.hidden or (starts is not None and site.name in starts):
                plan.perms[site.name] = hidden_perm if site.hidden else starts[site.name]
                plan.seconds[site.name] = 0.0
                continue
            plan.perms[site.name] = _site_permutation(
                site, [scores[s] for s in site.linears], [weights[s].float() for s in site.linears], group_stats,
                n, m, config, method,
            )
            plan.seconds[site.name] = time.perf_counter() - start
    return plan


@torch.no_grad()
def _apply_plan(plan: BlockPlan, n: int, m: int, report: PruneReport) -> dict[str, torch.Tensor]:
    """Prune every linear of ``plan`` on its site's permutation; record it; return masks by full name."""
    masks = {}
    for site in plan.sites:
        perm = plan.perms[site.name]
        report.permutations[f"{plan.name}.{site.name}"] = perm.tolist()
        for name in site.linears:
            scores, weight = plan.scores[name], plan.weights[name]
            identity_kept = _kept_fraction(scores, nm_mask(scores, n, m))
            mask = apply_permuted_mask(weight, scores, perm, n, m)
            masks[f"{plan.name}.{name}"] = mask
            report.layers.append({
                "name": f"{plan.name}.{name}", "shape": list(weight.shape), "site": site.name,
                "kept_score": _kept_fraction(scores, mask), "kept_score_identity": identity_kept,
                "search_seconds": plan.seconds[site.name],
            })
    return masks


@torch.no_grad()
def prune_block(
    block: nn.Module, block_name: str, groups: list[tuple[str, ...]], stats: dict[str, InputStats],
    config: PruneConfig, adapter: Adapter, geometry: AttentionGeometry, report: PruneReport,
    block_data: BlockData | None = None, hidden_perm: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Prune one block's target linears; returns the masks by full linear name.

    Permutations come from a search per site, or (``perm="learned"``, blockwise) from training that
    starts at the search's result (``block_data`` then holds the block's inputs and dense outputs).
    """
    kind, target = config.target()
    if kind == "unstructured":
        masks = {}
        weights, scores = _weights_and_scores(block, groups, stats, config)
        for name, weight in weights.items():
            mask = unstructured_mask(scores[name], target)
            weight.mul_(mask.to(weight.dtype))
            masks[f"{block_name}.{name}"] = mask
            report.layers.append({"name": f"{block_name}.{name}", "shape": list(weight.shape),
                                  "kept_score": _kept_fraction(scores[name], mask)})
        return masks
    n, m = target
    plan = _plan_block(block, block_name, groups, stats, config, adapter, geometry, hidden_perm)
    if _learning(config) and config.learn_mode == "blockwise" and plan.trainable:
        with torch.enable_grad():
            learned, history = learn_block_permutations(
                block, plan.trainable, plan.weights, plan.scores, plan.perms, n, m, config, geometry, block_data
            )
        plan.perms.update(learned)
        report.training[block_name] = history
    return _apply_plan(plan, n, m, report)


class ResumeState:
    """Per-block progress on disk, so an interrupted run resumes where it stopped.

    After each block: its masks (bit-packed) and permutations, then the next block's inputs, each
    written to a temporary name and renamed, so a crash never leaves a half-written step behind.
    """

    def __init__(self, folder: Path, config: PruneConfig):
        self.folder = folder
        self.fingerprint = config.fingerprint()
        folder.mkdir(parents=True, exist_ok=True)
        progress = folder / "progress.json"
        self.done = 0
        if progress.is_file():
            saved = json.loads(progress.read_text())
            if saved["fingerprint"] != self.fingerprint:
                raise FileExistsError(
                    f"{folder} holds progress of a run with another configuration; remove it or pass --overwrite"
                )
            self.done = saved["blocks_done"]

    def _atomic(self, path: Path, write) -> None:
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        os.replace(tmp, path)

    def save(self, index: int, masks: dict[str, torch.Tensor], report: PruneReport, inputs: torch.Tensor,
             reference: torch.Tensor | None) -> None:
        packed = {name: (list(mask.shape), np.packbits(mask.numpy().ravel())) for name, mask in masks.items()}
        self._atomic(self.folder / f"block_{index:04d}.pt", lambda p: torch.save(
            {"masks": packed, "layers": report.layers, "permutations": report.permutations,
             "training": report.training}, p))
        self._atomic(self.folder / "inputs.pt", lambda p: torch.save({"inputs": inputs, "reference": reference}, p))
        self._atomic(self.folder / "progress.json", lambda p: p.write_text(
            json.dumps({"fingerprint": self.fingerprint, "blocks_done": index + 1})))

    def restore(self, model: nn.Module, report: PruneReport) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Re-apply the masks of finished blocks; return the saved inputs of the next block, and the dense
        model's (``compensate``)."""
        if self.done == 0:
            return None
        state = None
        for index in range(self.done):
            state = torch.load(self.folder / f"block_{index:04d}.pt", weights_only=False)
            for name, (shape, bits) in state["masks"].items():
                mask = torch.from_numpy(np.unpackbits(bits)[: int(np.prod(shape))].reshape(shape).astype(bool))
                with torch.no_grad():
                    weight = linear_weight(model.get_submodule(name))
                    weight.mul_(mask.to(weight.dtype))
        report.layers, report.permutations, report.training = state["layers"], state["permutations"], state["training"]
        saved = torch.load(self.folder / "inputs.pt")
        return saved["inputs"], saved["reference"]




@torch.no_grad()
def hidden_permutation(
    model: nn.Module, adapter: Adapter, groups_per_block: list[list[tuple[str, ...]]], inputs: torch.Tensor,
    kwargs: dict, config: PruneConfig, pattern: tuple[int, int], progress: bool,
) -> torch.Tensor:
    """One permutation of the hidden dimension for every reader of the residual stream (``global``).

    Chosen once, before pruning, on the stacked host scores of all residual readers of the dense model
    (rows normalised per linear so no layer dominates), with the ``cp`` or ``ria`` search (``ria`` when
    the configured method needs per-linear Gram matrices).
    """
    method = config.perm if config.perm in ("cp", "ria") else "ria"
    stacked = []
    for i, block in enumerate(tqdm(adapter.blocks(model), desc="global permutation statistics", disable=not progress)):
        readers = [g for g in groups_per_block[i] if all(name in adapter.residual_readers for name in g)]
        stats, inputs = collect_input_stats(block, {g[0]: g[0] for g in readers}, inputs, kwargs, False, f"block {i}")
        for group in readers:
            for name in group:
                score = compute_score(config.score, linear_weight(block.get_submodule(name)), stats[group[0]].act_norm)
                stacked.append(score / score.sum().clamp_min(1e-30))
    return find_permutation(torch.cat(stacked), *pattern, method, groups=config.perm_groups, seed=config.seed)


def _prune_end_to_end(
    model: nn.Module, adapter: Adapter, geometry: AttentionGeometry, groups_per_block: list[list[tuple[str, ...]]],
    inputs: torch.Tensor, kwargs: dict, samples: torch.Tensor, config: PruneConfig, report: PruneReport,
    hidden_perm: torch.Tensor | None, progress: bool, state_dir: Path | None,
) -> None:
    """``learn_mode="e2e"``: search every block's start on dense-model statistics, train all at once, prune.

    The searched starts are saved in ``state_dir``, so an interrupted run resumes with training (the
    statistics pass is repeated: it is cheap next to the searches); training itself starts again.
    """
    n, m = config.target()[1]
    saved = None if state_dir is None else state_dir / "e2e_starts.pt"
    starts = {}
    if saved is not None and saved.is_file():
        state = torch.load(saved)
        if state["fingerprint"] != config.fingerprint():
            raise FileExistsError(f"{saved.parent} holds progress of a run with another configuration; remove it "
                                  "or pass --overwrite")
        starts = state["starts"]
    plans = []
    blocks = adapter.blocks(model)
    for i in tqdm(range(len(blocks)), desc="statistics and starts", disable=not progress):
        name, readers = f"{adapter.blocks_path}.{i}", {group[0]: group[0] for group in groups_per_block[i]}
        want_gram = needs_gram(config.learn_init) and name not in starts
        stats, inputs = collect_input_stats(blocks[i], readers, inputs, kwargs, want_gram, name, config.batch_size)
        plans.append(_plan_block(blocks[i], name, groups_per_block[i], stats, config, adapter, geometry, hidden_perm,
                                 starts.get(name)))
    if saved is not None and not starts:
        state_dir.mkdir(parents=True, exist_ok=True)
        state = {"fingerprint": config.fingerprint(), "starts": {plan.name: plan.perms for plan in plans}}
        torch.save(state, saved.with_name(saved.name + ".tmp"))
        os.replace(saved.with_name(saved.name + ".tmp"), saved)
    if any(plan.trainable for plan in plans):
        with torch.enable_grad():
            learned, report.training["model"] = learn_model_permutations(
                model, plans, n, m, config, geometry, samples, progress)
        for plan in plans:
            plan.perms.update(learned.get(plan.name, {}))
    for plan in plans:
        _apply_plan(plan, n, m, report)


def prune(
    model: nn.Module, tokenizer, config: PruneConfig, *, calibration: torch.Tensor | None = None,
    state_dir: str | Path | None = None, progress: bool = True,
) -> PruneReport:
    """Prune ``model`` in place as ``config`` says; see the module docstring for the order of work.

    ``calibration`` (token windows, ``(nsamples, seqlen)``) replaces drawing them from ``config.calib``.
    ``state_dir`` keeps per-block progress so that an interrupted run resumes where it stopped.
    """
    config.validate()
    start = time.perf_counter()
    adapter = adapter_for(model)
    geometry = adapter.attention(model.config)
    kind, target = config.target()
    groups_per_block, skipped = _select_targets(model, adapter, config, target[1] if kind == "nm" else None)
    report = PruneReport(config=asdict(config), skipped=skipped)
    blocks = adapter.blocks(model)
    prefix = adapter.blocks_path

    search = config.learn_init if _learning(config) else config.perm
    want_gram = needs_gram(search)
    if config.score == "magnitude" and not want_gram and not _learning(config) and config.binding != "global":
        for i, block in enumerate(tqdm(blocks, desc="pruning blocks", disable=not progress)):
            prune_block(block, f"{prefix}.{i}", groups_per_block[i], {}, config, adapter, geometry, report)
        report.seconds, report.peak_rss_mb = time.perf_counter() - start, peak_rss_mb()
        return report

    samples = calibration
    if samples is None:
        ids = data.tokenize(tokenizer, data.load_text(config.calib))
        samples = data.calibration_windows(ids, config.nsamples, config.seqlen, config.seed)
    inputs, kwargs = capture_block_inputs(model, adapter, samples, config.batch_size)
    hidden_perm = None
    if config.binding == "global" and search != "none":
        hidden_perm = hidden_permutation(model, adapter, groups_per_block, inputs, kwargs, config, target, progress)
        report.hidden_permutation = hidden_perm.tolist()
    if _learning(config) and config.learn_mode == "e2e":
        _prune_end_to_end(model, adapter, geometry, groups_per_block, inputs, kwargs, samples, config, report,
                          hidden_perm, progress, None if state_dir is None else Path(state_dir))
        report.seconds, report.peak_rss_mb = time.perf_counter() - start, peak_rss_mb()
        return report
    resume = ResumeState(Path(state_dir), config) if state_dir is not None else None
    first = 0
    compensating = config.compensate and config.propagate == "pruned" and not _learning(config) and needs_gram(search)
    reference = inputs if compensating else None  # the dense model's hidden states
    if resume is not None:
        restored = resume.restore(model, report)
        if restored is not None:
            (inputs, reference), first = restored, resume.done
    bar = tqdm(range(first, len(blocks)), desc="pruning blocks", disable=not progress, initial=first, total=len(blocks))
    for i in bar:
        block, name = blocks[i], f"{prefix}.{i}"
        readers = {group[0]: group[0] for group in groups_per_block[i]}
        stats, dense_out = collect_input_stats(block, readers, inputs, kwargs, want_gram, name, config.batch_size)
        if reference is not None:
            next_reference = collect_drift(block, readers, inputs, reference, kwargs, stats, config.batch_size)
        block_data = BlockData(inputs, dense_out, kwargs) if _learning(config) else None
        masks = prune_block(block, name, groups_per_block[i], stats, config, adapter, geometry, report, block_data,
                            hidden_perm)
        inputs = run_block(block, inputs, kwargs, config.batch_size) if config.propagate == "pruned" else dense_out
        if reference is not None:
            reference = next_reference
        if not torch.isfinite(inputs).all():
            raise FloatingPointError(f"non-finite activations leaving {name} after pruning")
        if resume is not None:
            resume.save(i, masks, report, inputs, reference)
    report.seconds, report.peak_rss_mb = time.perf_counter() - start, peak_rss_mb()
    return report
