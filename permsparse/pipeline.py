"""Pruning a whole model to N:M (or unstructured) sparsity, block by block, read top to bottom.

For each block: record the input statistics of its linears while the dense block runs, choose a
permutation per site (a search, or learning that starts from one), prune every target linear to N:M on
its permuted host score, then run the pruned block to make the next block's inputs. The pruned weight
is stored in the original column order (``W * unpermute(mask)``), so the model runs unchanged and
loads anywhere. The ``e2e`` learned permutation instead gathers every block's statistics and starts on
the dense model first, learns all permutations at once, then prunes.

Packed mixture-of-experts weights are pruned as one linear per expert projection
(:func:`permsparse.discover.experts_as_linears`), each on the statistics of the tokens routed to its
expert; the routers stay dense.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import Learned, PruneConfig
from .data.calibration import CalibrationSet, calibration, source_digest
from .data.images import reads_images
from .data.imagetext import images_attached, require_processor
from .discover import experts_as_linears, find_blocks, find_towers, is_packed_experts, vision_tower
from .discover.adapters import Adapter, AttentionGeometry, adapter_for, linear_weight
from .permute.learned import BlockData, Plan, learn_block, learn_model, tile_size
from .permute.search import find_permutation, needs_gram
from .permute.sites import search_site, sites_for_group
from .quant.apply import indivisible, quantize_linears, restore_quantized, saved_quantized
from .report import LayerRecord, PruneReport, SiteRecord, peak_device_mb, peak_rss_mb
from .run import distributed
from .run.identity import ResumeKey, model_digest, permsparse_version, tensors_digest, tokenizer_digest
from .run.memory import check_memory, needs_offload
from .run.placement import Placement, arrange_model, block_on, compute_device, input_device, is_offloaded
from .run.progress import bar
from .run.resume import Progress, pack_mask, unpack_mask
from .sparsity.scores import compute_score
from .sparsity.statistics import (InputStats, block_arguments, capture_block_inputs, collect_drift, collect_input_stats,
                                  run_block, window_arguments)
from .sparsity.targets import select_targets
from .per_tower import merged, prefixed, reading_projector_input, tower_config
from .train.distill import dense_weights, distill
from .train.following_masks import FollowingMasks, FollowingSite
from .permute.objective import objective
from .update.layer import kept_share, prune_layer


@dataclass
class Run:
    """One pruning run: the model, what its family looks like, the config, and what is done so far."""

    model: nn.Module
    adapter: Adapter
    geometry: AttentionGeometry
    config: PruneConfig
    targets: list[list[tuple[str, ...]]]  # per block: groups of linears (block-relative) that read one input
    report: PruneReport
    progress: Progress
    show: bool
    device: torch.device  # where every tensor of the run lives
    offloaded: bool  # the blocks wait on the host and visit the device one at a time
    act_norms: dict[str, torch.Tensor | None] = field(default_factory=dict)  # by full linear name, as pruned

    def to_device(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """``tensor`` on the run's device; images also in the model's dtype."""
        if tensor is None:
            return None
        dtype = next(self.model.parameters()).dtype if tensor.is_floating_point() else tensor.dtype
        return tensor.to(self.device, dtype)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.adapter.blocks(self.model)

    def name(self, i: int) -> str:
        return f"{self.adapter.blocks_path}.{i}"

    def readers(self, i: int) -> dict[str, str]:
        """One hooked linear per input group of block ``i`` (the group's first)."""
        return {group[0]: group[0] for group in self.targets[i]}


def prune(model: nn.Module, tokenizer, config: PruneConfig, *, windows: torch.Tensor | None = None,
          holdout: torch.Tensor | None = None, labels: tuple[torch.Tensor, torch.Tensor] | None = None,
          state_dir=None, progress: bool = True, placement: Placement | None = None,
          allow_dense: bool = True) -> PruneReport:
    """Prune ``model`` in place as ``config`` says; return what was done.

    ``windows`` (token ids ``(nsamples, seqlen)``, or preprocessed images ``(nsamples, 3, H, W)`` for a
    vision model) replaces drawing the calibration windows from ``config.calibration``, and ``holdout``
    the held-out windows a learned permutation is judged on; ``labels`` are the class labels of both, which
    an image classifier's learned permutation trains on. ``tokenizer`` is a vision model's image
    processor. ``state_dir`` keeps progress so an interrupted run resumes where it stopped.
    ``placement`` moves the model to its device, whole or offloaded (:mod:`permsparse.run.placement`), where
    it stays; without it the run computes where the model is. Unless ``allow_dense``, a config that prunes
    no linear of the model (a pattern no linear's width divides, patterns that match nothing) is refused.

    A vision-language model prunes the towers ``config.towers`` names (:mod:`permsparse.per_tower`), each
    on its own calibration sources; given ``windows`` serve the tower that reads them (token ids: the
    language tower, images: the vision tower), and ``tokenizer`` is the model's processor.
    """
    towers = find_towers(model)
    if towers is None:
        if config.towers != "language":
            raise ValueError(f"{type(model).__name__} has no vision tower: --towers {config.towers} is for "
                             "vision-language models")
        return prune_model(model, tokenizer, config, windows=windows, holdout=holdout, labels=labels,
                           state_dir=state_dir, progress=progress, placement=placement, allow_dense=allow_dense)
    pruned = ("language", "vision") if config.towers == "both" else (config.towers,)
    if windows is not None and ("vision" if windows.is_floating_point() else "language") not in pruned:
        raise ValueError(f"the windows given are {'images' if windows.is_floating_point() else 'token ids'}, which "
                         f"the {config.towers} tower does not read")
    if "vision" in pruned and tokenizer is not None and not (windows is not None and windows.is_floating_point()):
        require_processor(tokenizer, f"--towers {config.towers} (the vision tower calibrates on images)")
    reports = []
    for tower in pruned:
        vision = tower == "vision"
        path, part = vision_tower(model) if vision else ("", model)
        given = windows is not None and windows.is_floating_point() == vision  # the windows this tower reads
        tower_cfg = tower_config(config, tower, path, given)
        if tower_cfg is None:
            continue
        with reading_projector_input(model, part) if vision else contextlib.nullcontext():
            report = prune_model(part, getattr(tokenizer, "image_processor", tokenizer) if vision else tokenizer,
                                 tower_cfg, windows=windows if given else None, holdout=holdout if given else None,
                                 labels=labels if given else None, progress=progress, placement=placement,
                                 state_dir=None if state_dir is None else Path(state_dir) / tower,
                                 allow_dense=allow_dense)
        reports.append(prefixed(report, path) if vision else report)
    if not reports:
        raise ValueError(f"--include {' '.join(config.include)} names no linear of the {config.towers} tower")
    return merged(reports)


def prune_model(model: nn.Module, tokenizer, config: PruneConfig, *, windows: torch.Tensor | None = None,
                holdout: torch.Tensor | None = None, labels: tuple[torch.Tensor, torch.Tensor] | None = None,
                state_dir=None, progress: bool = True, placement: Placement | None = None,
                allow_dense: bool = True) -> PruneReport:
    """:func:`prune` of a model of one tower (a language model, an encoder, a vision model)."""
    started = time.perf_counter()
    key = None if state_dir is None else resume_key(model, tokenizer, config, windows, holdout, labels)
    device, offloaded = arrange(model, config, placement, windows, holdout)
    with experts_as_linears(model):
        run = start_run(model, config, state_dir, progress, device, offloaded, key=key, allow_dense=allow_dense)
        prune_run(run, tokenizer, windows, holdout, labels)
    run.report.seconds, run.report.peak_rss_mb = time.perf_counter() - started, peak_rss_mb()
    run.report.peak_device_mb = peak_device_mb(run.device)
    return run.report


def arrange(model: nn.Module, config: PruneConfig, placement: Placement | None, windows: torch.Tensor | None,
            holdout: torch.Tensor | None) -> tuple[torch.device, bool]:
    """Move ``model`` where ``placement`` says: whole to its device, or offloaded when asked or when the
    memory estimate (on the configured or given windows) says the model and the run do not fit the device
    together. Returns the device and whether the model is offloaded. Runs before packed experts are split
    into linears, whose weights must stay views of the packed tensors."""
    if placement is None:
        return input_device(model), is_offloaded(model)
    device = compute_device(placement.device)
    blocks_path = find_blocks(model)
    if placement.offload == "auto":  # on the configured window counts and lengths (images: counted by count)
        counts = (config.calibration.nsamples if windows is None else len(windows),
                  (config.calibration.holdout if config.judged else 0) if holdout is None else len(holdout))
        seqlen = config.calibration.seqlen if windows is None or not windows.is_floating_point() else 0
        wanted = needs_offload(model, blocks_path, config, *(torch.zeros(()).expand(n, seqlen) for n in counts),
                               device)
    else:
        wanted = placement.offload == "on"
    if not wanted:
        arrange_model(model, device, False)
        return device, False
    whole = config.learned is not None and config.learned.scope == "e2e"
    if whole or config.distill.steps:
        what = "the e2e learned permutation" if whole else "distillation of the kept weights"
        why = "--offload on was given" if placement.offload == "on" else f"the model does not fit {device} beside the run"
        raise ValueError(f"{what} trains the whole model at once and cannot offload its blocks ({why}): use --scope "
                         "blockwise without --distill-steps, lower --batch or --seqlen, or a larger GPU")
    if any(is_packed_experts(m) for m in model.modules()):
        raise ValueError("offloading mixture-of-experts blocks is not supported: their packed expert weights are "
                         "split into linear views that must not move; use a device that holds the model")
    if device.type != "cuda":
        raise ValueError(f"--offload on keeps the blocks on the host for a GPU; the device is {device}")
    adapter_for(model)  # discovery's probe pass runs on the host, before blocks and the rest are apart
    arrange_model(model, device, True)
    return device, True


def resume_key(model: nn.Module, tokenizer, config: PruneConfig, windows: torch.Tensor | None = None,
               holdout: torch.Tensor | None = None, labels=None) -> ResumeKey:
    """The key of ``model``'s (still dense) run under ``config``: its progress resumes only a run of the same key."""
    data = (source_digest(config.calibration.source) if windows is None
            else tensors_digest(windows, holdout, labels))
    return ResumeKey(model_digest(model), tokenizer_digest(tokenizer), data, config.fingerprint(), permsparse_version())


def start_run(model: nn.Module, config: PruneConfig, state_dir, progress: bool, device: torch.device | None = None,
              offloaded: bool = False, key: ResumeKey | None = None, allow_dense: bool = True) -> Run:
    """The run's structure, targets and resume state; an objective the model cannot have fails here. The run
    computes on ``device`` (the model's, by default). Progress in ``state_dir`` resumes only under the same
    ``key`` (by default the model's, without tokenizer, on the config's calibration source)."""
    adapter = adapter_for(model)
    if config.learned is not None and config.learned.scope == "e2e":
        objective(model, config.learned)
    if config.distill.steps:
        objective(model, config.distill)
        if any(kind.routers for kind in adapter.kinds):
            raise ValueError(f"{type(model).__name__}: distillation of the kept weights does not train "
                             "mixture-of-experts layers yet; prune without --distill-steps")
    targets, skipped = select_targets(model, adapter, config)
    if not allow_dense and not any(targets):
        why = f"; in_features not divisible by M={config.nm[1]}: {len(skipped)} linears" if skipped else ""
        raise ValueError(f"--pattern {config.pattern} prunes no linear of {type(model).__name__}{why} (--include/"
                         "--exclude may leave none too); pass --allow-dense to save it unpruned")
    if state_dir is not None and key is None:
        key = resume_key(model, None, config)
    blocks = range(len(adapter.blocks(model)))
    routers = [f"{adapter.blocks_path}.{i}.{name}" for i in blocks for name in adapter.kind(i).routers]
    kept = {f"{adapter.blocks_path}.{i}.{part.name}": part.reason for i in blocks for part in adapter.kind(i).kept_dense}
    run = Run(model, adapter, adapter.attention(model.config), config, targets,
              PruneReport(skipped=skipped, dense=routers, kept_dense=kept), Progress(state_dir, key), progress,
              input_device(model) if device is None else device, offloaded)
    widths = {name: linear_weight(model.get_submodule(name)).shape[1] for name in target_names(run)}
    run.report.unquantized = indivisible(config.quant, widths, config.strict)
    return run


def prune_run(run: Run, tokenizer, windows: torch.Tensor | None, holdout: torch.Tensor | None,
              labels: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Calibrate (when the config needs it) and prune every block, as the config says."""
    model, adapter, config, progress = run.model, run.adapter, run.config, run.show
    if not needs_calibration(config):
        for i in bar(range(len(run.blocks)), desc="pruning blocks", disable=not progress):
            with block_on(run.blocks[i], run.device):
                with run.report.timed("pruning"):
                    plan = plan_block(run, i, {}, None)
                    masks = apply_plan(run, plan)
                quantize_pruned(run, plan, masks)
    else:
        if windows is None and not reads_images(model):  # what cannot fit is refused before the draw
            counts = (config.calibration.nsamples, config.calibration.holdout if config.judged else 0)
            check_memory(model, adapter.blocks_path, config,
                         *(torch.zeros(()).expand(n, config.calibration.seqlen) for n in counts), run.device,
                         run.offloaded)
        with run.report.timed("calibration"):
            calib = calibration(model, tokenizer, config, windows, holdout, labels, show=progress)
        calib = CalibrationSet(*(run.to_device(t) for t in (calib.windows, calib.holdout)),
                               None if calib.labels is None else tuple(map(run.to_device, calib.labels)),
                               run.to_device(calib.distill), run.to_device(calib.distill_labels), calib.images)
        windows, holdout, labels = calib.windows, calib.holdout, calib.labels
        check_memory(model, adapter.blocks_path, config, *(sequences(model, adapter, w) for w in (windows, holdout)),
                     run.device, run.offloaded)
        with images_attached(model, calib.images):
            prune_calibrated(run, calib)


def prune_calibrated(run: Run, calib: CalibrationSet) -> None:
    """Prune every block on the calibration set, as the config says."""
    model, adapter, config = run.model, run.adapter, run.config
    windows, holdout, labels = calib.windows, calib.holdout, calib.labels
    dense = dense_weights(model, target_names(run)) if config.distill.steps else None
    if len(windows) < distributed.world() or 0 < len(holdout) < distributed.world():
        raise ValueError(f"{distributed.world()} processes need at least as many calibration and held-out windows")
    mine = distributed.shard(windows)  # this process's share; the held-out windows run through the blocks
    held = distributed.shard(holdout) if config.learned is not None else holdout[:0]  # only to judge permutations
    with run.report.timed("statistics"):
        inputs, kwargs = capture_block_inputs(model, adapter, torch.cat([mine, held]), config.calibration.batch_size)
    hidden = global_permutation(run, inputs[:len(mine)], kwargs) if config.binding == "global" else None
    if config.learned is not None and config.learned.scope == "e2e":
        prune_end_to_end(run, inputs, kwargs, windows, holdout, len(mine), hidden, labels)
    else:
        prune_block_by_block(run, inputs, kwargs, len(mine), hidden)
    if dense is not None:
        del inputs, kwargs
        with run.report.timed("distillation"):
            distill_run(run, dense, calib)


def on_device(perm: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if perm is None else perm.to(device)


def needs_calibration(config: PruneConfig) -> bool:
    return (config.score != "magnitude" or needs_gram(config.start) or config.learned is not None
            or config.binding == "global" or config.distill.steps > 0 or config.quant.needs_hessian)


def target_names(run: Run) -> list[str]:
    """Full names of every linear the run prunes, block by block."""
    return [f"{run.name(i)}.{name}" for i, groups in enumerate(run.targets) for group in groups for name in group]


def sequences(model: nn.Module, adapter: Adapter, windows: torch.Tensor) -> torch.Tensor:
    """``windows`` as the memory estimate reads them, ``(count, tokens)``: token ids as they are; images as
    a shape only, of the length of the sequence the first block reads (captured on one image)."""
    if not windows.is_floating_point():
        return windows
    tokens = capture_block_inputs(model, adapter, windows[:1])[0].shape[1] if len(windows) else 0
    return torch.zeros(()).expand(len(windows), tokens)


@torch.no_grad()
def plan_block(run: Run, i: int, stats: dict[str, InputStats], hidden: torch.Tensor | None,
               starts: dict[str, torch.Tensor | None] | None = None) -> Plan:
    """Host statistics and sites of block ``i``, each site's permutation searched with the config's
    method (a learned permutation's warm start), or taken from ``starts`` when a resumed run has them."""
    config = run.config
    block = run.blocks[i]
    plan = Plan(run.name(i), block, {}, [], {}, {})
    for group in run.targets[i]:
        group_stats = stats.get(group[0])
        if group_stats is not None and not group_stats.tokens:
            run.report.uncalibrated += [f"{plan.name}.{name}" for name in group  # once, though planned twice
                                        if f"{plan.name}.{name}" not in run.report.uncalibrated]
        for name in group:
            plan.act_norms[name] = None if group_stats is None else group_stats.act_norm
            if group_stats is not None and group_stats.gram is not None:
                plan.grams[name] = group_stats.gram
        if config.nm is None:
            plan.sites += sites_for_group(group, "per-linear", run.adapter.kind(i), run.geometry)
            continue
        for site in sites_for_group(group, config.binding, run.adapter.kind(i), run.geometry):
            plan.sites.append(site)
            started = time.perf_counter()
            if site.hidden:
                width = linear_weight(block.get_submodule(site.linears[0])).shape[1]
                plan.perms[site.name] = torch.arange(width, device=run.device) if hidden is None else hidden
            elif starts is not None and site.name in starts:
                plan.perms[site.name] = None if starts[site.name] is None else starts[site.name].to(run.device)
            elif config.start == "random":
                plan.perms[site.name] = None  # the learner draws random costs
            else:
                weights = [linear_weight(block.get_submodule(s)).float() for s in site.linears]
                plan.perms[site.name] = search_site(
                    site, [plan.scores(s, config.host) for s in site.linears], weights, group_stats, config)
            plan.seconds[site.name] = time.perf_counter() - started
    return plan


@torch.no_grad()
def apply_plan(run: Run, plan: Plan, starts: dict[str, torch.Tensor | None] | None = None) -> dict[str, torch.Tensor]:
    """Prune every linear of ``plan`` through its site's permutation; record it; return masks by full name.

    With a weight-updating host the kept weights are updated too, on the
    linear's Gram matrix, and the mask is the host's own inside the permuted groups or the permutation's.
    ``starts`` (by site: the start's search, when ``plan`` holds learned permutations) are tried by the
    update as well: each site keeps whichever permutation the update reconstructs with the lower output
    error on the calibration inputs, since the learned permutation is trained for the frozen-weight
    mask, not for the update.
    """
    config, masks = run.config, {}
    update = config.updates
    run.act_norms.update({f"{plan.name}.{name}": norm for name, norm in plan.act_norms.items()})
    for site in plan.sites:
        full_names = [f"{plan.name}.{name}" for name in site.linears]
        candidates = [on_device(plan.perms.get(site.name), run.device)]
        start = on_device((starts or {}).get(site.name), run.device) if update and config.nm is not None else None
        if start is not None and not torch.equal(start, candidates[0]):
            candidates.append(start)
        per_candidate = [[prune_layer(config, linear_weight(plan.module.get_submodule(name)), plan.scores(name, config.host),
                                      plan.grams.get(name), perm) for name in site.linears] for perm in candidates]
        best = 0 if len(candidates) == 1 else min(
            range(len(candidates)), key=lambda k: sum(layer.update.error for layer in per_candidate[k]))
        perm = candidates[best]
        if best:
            run.report.kept_start.append(f"{plan.name}.{site.name}")
        if config.nm is not None:
            run.report.sites.append(SiteRecord(f"{plan.name}.{site.name}", full_names, perm.tolist()))
        for name, full, layer in zip(site.linears, full_names, per_candidate[best]):
            weight = linear_weight(plan.module.get_submodule(name))
            mask, errors = layer.mask, layer.errors
            if update:
                weight.copy_(layer.update.weight)
                mask = layer.update.mask
            else:
                weight.mul_(mask.to(weight.dtype))
            masks[full] = mask
            run.report.layers.append(LayerRecord(
                full, tuple(weight.shape), None if config.nm is None else f"{plan.name}.{site.name}",
                kept_share(layer.scores, mask), None if layer.identity_mask is None
                else kept_share(layer.scores, layer.identity_mask), plan.seconds.get(site.name), *errors))
    run.report.weights_updated = run.report.weights_updated or update
    return masks


def quantize_pruned(run: Run, plan: Plan, masks: dict[str, torch.Tensor]) -> None:
    """With ``--quant``: the block's pruned linears (``masks``, by full name) quantized through their sites'
    permutations on the block's Gram matrices (:mod:`permsparse.quant.apply`); the model runs the dequantized
    weights from here on, so later blocks calibrate on what is deployed."""
    if not run.config.quant.enabled:
        return
    with run.report.timed("quantization"):
        perms = {name: run.report.permutation_of(name) for name in masks}
        perms = {name: None if perm is None else torch.as_tensor(perm) for name, perm in perms.items()}
        grams = {f"{plan.name}.{name}": gram for name, gram in plan.grams.items()}
        run.report.quantized += quantize_linears(run.model, masks, perms, grams, run.config.quant,
                                                 run.report.unquantized)


def prune_block_by_block(run: Run, inputs: torch.Tensor, kwargs: dict, count: int, hidden: torch.Tensor | None) -> None:
    """Statistics, permutations (searched, or learned per block) and masks, one block after the other.

    ``inputs`` holds the ``count`` training windows' hidden states, then the held-out windows'.
    """
    config, learned = run.config, run.config.learned
    batch = config.calibration.batch_size
    compensating = (config.permutation.method == "output" and config.permutation.compensate
                    and config.calibration.propagate == "pruned") if learned is None else False
    if compensating and any(kind.routers for kind in run.adapter.kinds):
        warnings.warn("the output search aims at the pruned model's own outputs here: routing sends other tokens "
                      "to each expert from the dense and the pruned inputs, so no drift can be compensated",
                      stacklevel=3)
        compensating = False
    reference = inputs if compensating else None  # the dense model's hidden states
    first = 0
    saved = run.progress.load("blocks")
    if saved is not None:
        stream = run.progress.load(f"stream-{distributed.rank()}")
        if stream is None or stream["done"] != saved["done"]:
            raise FileExistsError(f"{run.progress.folder} holds progress this process cannot resume from; remove it "
                                  "or pass --overwrite")
        first, inputs, reference = saved["done"], run.to_device(stream["inputs"]), run.to_device(stream["reference"])
        restore(run, saved)
    blocks = bar(range(first, len(run.blocks)), desc="pruning blocks", initial=first, total=len(run.blocks),
               disable=not run.show)
    for i in blocks:
        with block_on(run.blocks[i], run.device):  # an offloaded block visits the device
            block, name, arguments = run.blocks[i], run.name(i), block_arguments(kwargs, i)
            training = window_arguments(arguments, slice(0, count))
            held_out = window_arguments(arguments, slice(count, None))
            with run.report.timed("statistics"):
                stats, dense_out = collect_input_stats(block, run.readers(i), inputs[:count], training,
                                                       needs_gram(config.start) or config.updates
                                                       or config.quant.needs_hessian, name, batch)
                if reference is not None:
                    next_reference = collect_drift(block, run.readers(i), inputs, reference, arguments, stats, batch)
                dense_holdout = (run_block(block, inputs[count:], held_out, batch) if len(inputs) > count
                                 else inputs[count:])
            with run.report.timed("search"):
                plan = plan_block(run, i, stats, hidden)
            starts = dict(plan.perms) if learned is not None else None
            if learned is not None and any(not site.hidden for site in plan.sites):
                block_data = BlockData(inputs[:count], dense_out, inputs[count:], dense_holdout, training, held_out)
                with run.report.timed("learning"):
                    perms, record = learn_block(plan, block_data, config, run.geometry)
                plan.perms.update(perms)
                run.report.training.append(record)
            with run.report.timed("pruning"):
                masks = apply_plan(run, plan, starts)
            quantize_pruned(run, plan, masks)
            with run.report.timed("statistics"):
                if config.calibration.propagate == "pruned":
                    inputs = run_block(block, inputs, arguments, batch)
                else:
                    inputs = torch.cat([dense_out, dense_holdout])
            if not torch.isfinite(inputs).all():
                raise FloatingPointError(f"non-finite activations leaving {name} after pruning")
            if reference is not None:
                reference = next_reference
            save_blocks(run, i + 1, masks, inputs, reference)


def save_blocks(run: Run, done: int, masks: dict[str, torch.Tensor], inputs: torch.Tensor,
                reference: torch.Tensor | None) -> None:
    """Progress after ``done`` blocks: every mask so far (bit-packed), the weights a weight-updating host
    changed (a mask alone cannot restore them), the report, and each process's next inputs (its share of
    the windows)."""
    if run.progress.folder is None:
        return
    saved = None
    if distributed.is_main():  # rank 0 alone keeps the shared part (and may remove it once the run is done)
        saved = run.progress.load("blocks") or {"masks": {}, "weights": {}, "act_norms": {}}
        saved["masks"].update({name: pack_mask(mask) for name, mask in masks.items()})
        saved["act_norms"].update({name: run.act_norms[name] for name in masks})
        if run.config.updates or run.config.quant.enabled:
            saved["weights"].update({name: linear_weight(run.model.get_submodule(name)).detach().cpu().clone()
                                     for name in masks})
        saved.setdefault("quantized", {}).update(saved_quantized(run.model, masks))
        saved.update(done=done, report=run.report)
    run.progress.commit({} if saved is None else {"blocks": saved},
                        own={"stream": {"done": done, "inputs": inputs, "reference": reference}}, tag=str(done),
                        note=f"{done} of {len(run.blocks)} blocks pruned")


@torch.no_grad()
def restore(run: Run, saved: dict) -> None:
    """Re-apply the masks (or, from a weight-updating host, the weights) of the finished blocks and take
    their records."""
    for name, packed in saved["masks"].items():
        weight = linear_weight(run.model.get_submodule(name))
        if name in saved["weights"]:
            weight.copy_(saved["weights"][name])
        else:
            weight.mul_(unpack_mask(packed).to(weight.device, weight.dtype))
    run.act_norms.update(saved["act_norms"])
    restore_quantized(run.model, saved.get("quantized", {}))
    report = saved["report"]
    run.report.layers, run.report.sites, run.report.training = report.layers, report.sites, report.training
    run.report.quantized = report.quantized
    run.report.uncalibrated, run.report.kept_start = report.uncalibrated, report.kept_start
    run.report.stages = report.stages


def prune_end_to_end(run: Run, inputs: torch.Tensor, kwargs: dict, windows: torch.Tensor, holdout: torch.Tensor,
                     count: int, hidden: torch.Tensor | None, labels: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """``e2e``: statistics and starts of every block on the dense model, then every permutation learned
    at once, then every block pruned (with a weight-updating host: block by block on the pruned model's
    inputs, the reconstruction pass). Searched starts and the learner's state are saved as they come,
    so an interrupted run resumes with training where it stopped."""
    config = run.config
    first, training = inputs[:count], window_arguments(kwargs, slice(0, count))
    starts = run.progress.load("starts") or {}
    plans = []
    for i in bar(range(len(run.blocks)), desc="statistics and starts", disable=not run.show):
        name = run.name(i)
        want_gram = needs_gram(config.start) and name not in starts
        with run.report.timed("statistics"):
            stats, inputs = collect_input_stats(run.blocks[i], run.readers(i), inputs[:count],
                                                window_arguments(block_arguments(kwargs, i), slice(0, count)),
                                                want_gram, name, config.calibration.batch_size)
        with run.report.timed("search"):
            plans.append(plan_block(run, i, stats, hidden, starts.get(name)))
        plans[-1].grams = {}  # the searches used them; held for every block they would not fit a large model
    if not starts:
        run.progress.save("starts", {plan.name: plan.perms for plan in plans})
    if any(not site.hidden for plan in plans for site in plan.sites):
        with torch.enable_grad(), run.report.timed("learning"):
            learned, record = learn_model(run.model, plans, windows, holdout, config, run.geometry, progress=run.show,
                                          labels=labels, state=run.progress.load("training"),
                                          save_state=lambda state: run.progress.save("training", state))
        run.report.training.append(record)
        for plan in plans:
            plan.perms.update(learned.get(plan.name, {}))
    if not config.updates:
        with run.report.timed("pruning"):
            masks = [apply_plan(run, plan) for plan in plans]
        if not config.quant.needs_hessian:
            for plan, block_masks in zip(plans, masks):
                quantize_pruned(run, plan, block_masks)
            return
        inputs = first  # GPTQ: block by block on the pruned (and quantized) model's inputs, as reconstruction does
        for i, (plan, block_masks) in enumerate(zip(bar(plans, desc="quantization", disable=not run.show), masks)):
            with run.report.timed("statistics"):
                stats, _ = collect_input_stats(run.blocks[i], run.readers(i), inputs, block_arguments(training, i), True,
                                               plan.name, config.calibration.batch_size)
            plan.grams = {name: stats[group[0]].gram for group in run.targets[i] for name in group}
            quantize_pruned(run, plan, block_masks)
            with run.report.timed("statistics"):
                inputs = run_block(run.blocks[i], inputs, block_arguments(training, i), config.calibration.batch_size)
        return
    inputs = first  # reconstruction: block by block on the pruned model's inputs, as SparseGPT does
    for i, plan in enumerate(bar(plans, desc="weight updates", disable=not run.show)):
        with run.report.timed("pruning"):
            inputs = reconstruct_block(run, i, plan.perms, inputs, block_arguments(training, i), hidden)


def reconstruct_block(run: Run, i: int, learned: dict[str, torch.Tensor | None], inputs: torch.Tensor, kwargs: dict,
                      hidden: torch.Tensor | None) -> torch.Tensor:
    """Block ``i`` pruned and updated by the weight-updating host on ``inputs`` (the pruned model's), each
    site through its ``learned`` permutation or through the start's search re-run on these inputs,
    whichever the update reconstructs better (the search as a searched run on the same host would do
    it); returns the block's outputs."""
    batch = run.config.calibration.batch_size
    stats, _ = collect_input_stats(run.blocks[i], run.readers(i), inputs, kwargs, True, run.name(i), batch)
    plan = plan_block(run, i, stats, hidden)
    searched = dict(plan.perms)
    plan.perms.update(learned)
    quantize_pruned(run, plan, apply_plan(run, plan, searched))
    return run_block(run.blocks[i], inputs, kwargs, batch)


def distill_run(run: Run, dense: dict[str, torch.Tensor], calib: CalibrationSet) -> None:
    """Distil the pruned model's kept weights towards the dense ones (:func:`permsparse.train.distill.distill`),
    resuming from the saved state of an interrupted run."""
    labels = (calib.distill_labels, None if calib.labels is None else calib.labels[1])
    following = following_masks(run)
    record = distill(run.model, dense, calib.distill, calib.holdout, run.config.distill, seed=run.config.calibration.seed,
                     labels=labels, progress=run.show, state=run.progress.load("distill"),
                     save_state=lambda state: run.progress.save("distill", state), following=following)
    run.report.distillation = record
    run.report.weights_updated = True
    if following is not None:  # the permutations that chose the kept weights' masks
        kept = {site.name: perm.tolist() for site, perm in zip(following.sites, following.kept)}
        for site in run.report.sites:
            site.perm = kept.get(site.name, site.perm)


def following_masks(run: Run) -> FollowingMasks | None:
    """The masks that follow the weights as distillation trains them (``--distill-masks`` other than fixed):
    every site of the run with the permutation pruning chose, learned in the learned permutation's tiles
    (heads for the attention output; a reader of the global hidden permutation keeps it)."""
    config = run.config
    if config.distill.masks == "fixed":
        return None
    learned = config.learned or Learned()
    perms = {site.name: torch.as_tensor(site.perm) for site in run.report.sites}
    sites = []
    for i, groups in enumerate(run.targets if config.nm is not None else ()):
        for group in groups:
            for site in sites_for_group(group, config.binding, run.adapter.kind(i), run.geometry):
                name, width = f"{run.name(i)}.{site.name}", perms[f"{run.name(i)}.{site.name}"].numel()
                tile, tie = tile_size(width, learned.tile, config.nm[1]), None
                if site.heads is not None:
                    per_kv = site.heads.num_heads // site.heads.num_kv_heads
                    tile, tie = site.heads.head_dim, [h // per_kv for h in range(site.heads.num_heads)]
                sites.append(FollowingSite(name, tuple(f"{run.name(i)}.{linear}" for linear in site.linears),
                                           perms[name], tile, tie, learnable=not site.hidden))
    modules = {name: run.model.get_submodule(name) for name in target_names(run)}
    return FollowingMasks(config.distill.masks, modules, run.act_norms, config.host, config.nm, config.density, sites,
                          eps=(learned.eps_start, learned.eps_end), sinkhorn_iters=learned.sinkhorn_iters,
                          warm_sharpness=learned.warm_sharpness, seed=config.calibration.seed)


@torch.no_grad()
def global_permutation(run: Run, inputs: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    """One permutation of the hidden dimension for every reader of the residual stream (``global``).

    Chosen once, on the dense model, on the stacked host scores of all residual readers (rows
    normalised per linear so no layer dominates), with ``cp`` when that is the configured search and
    ``ria`` otherwise; None when nothing is permuted. Saved, so a resumed run uses the same one.
    """
    config = run.config
    if not config.permuted:
        return None
    hidden = run.progress.load("hidden")
    if hidden is not None:
        run.report.hidden_perm = hidden.tolist()
        return hidden.to(run.device)
    stacked = []
    for i, block in enumerate(bar(run.blocks, desc="global permutation statistics", disable=not run.show)):
        readers = [g for g in run.targets[i] if all(name in run.adapter.kind(i).residual_readers for name in g)]
        with block_on(block, run.device), run.report.timed("statistics"):
            stats, inputs = collect_input_stats(block, {g[0]: g[0] for g in readers}, inputs,
                                                window_arguments(block_arguments(kwargs, i), slice(0, len(inputs))),
                                                False, run.name(i), config.calibration.batch_size)
            for group in readers:
                for name in group:
                    score = compute_score(config.host, linear_weight(block.get_submodule(name)),
                                          stats[group[0]].act_norm)
                    stacked.append(score / score.sum().clamp_min(1e-30))
    method = "cp" if config.start == "cp" else "ria"
    chunks = config.permutation.chunks if config.learned is None else 1
    with run.report.timed("search"):
        hidden = find_permutation(torch.cat(stacked), *config.nm, method, chunks=chunks, seed=config.calibration.seed)
    run.progress.save("hidden", hidden)
    run.report.hidden_perm = hidden.tolist()
    return hidden
