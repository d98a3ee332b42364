"""Training the learned permutations, with every model weight frozen (only cost matrices train).

Two modes (method.md §3):

- ``blockwise``: one block at a time against the dense block's outputs. Memory is one block's, so a
  7B model fits where its one-shot pruning does; the pruned block's outputs feed the next block.
- ``e2e``: every permutation of the model at once, as in the paper: cross-entropy of the pruned model
  on the calibration windows plus ``alpha`` times the layer-wise distillation of every block's output
  against the dense model's. Costs a whole model's forward and backward per step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers.pytorch_utils import Conv1D

from .adapters import AttentionGeometry
from .calibration import block_output
from .learned import LearnConfig, SiteSpec, learn_permutations

EVAL_SAMPLES = 8


def distillation_loss(name: str, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Distance of a pruned block's output to the dense one, scale-free so blocks weigh alike."""
    if name == "mse":
        return F.mse_loss(output, target) / target.pow(2).mean().clamp_min(1e-12)
    if name == "smoothl1":
        scale = target.abs().mean().clamp_min(1e-12)
        return F.smooth_l1_loss(output / scale, target / scale)
    if name == "cosine":
        return 1 - F.cosine_similarity(output, target, dim=-1).mean()
    raise ValueError(f"unknown distillation loss {name!r}")


def site_spec(
    site, weights, scores, start: torch.Tensor | None, block: int, groups: int, geometry: AttentionGeometry
) -> tuple[SiteSpec, torch.Tensor]:
    """A site's learnable structure, and the base permutation it refines.

    With a warm start ``p0`` the learner permutes positions of ``W[:, p0]`` within contiguous blocks of
    ``block`` channels (a block-diagonal refinement, cheap to relax: Sinkhorn costs ``width * block``),
    starting at the identity; the result is ``p0[q]``. The attention output keeps blocks of one head,
    tied per kv group, so the result still folds. Random starts learn over ``width / groups`` channels.
    """
    width = scores[site.linears[0]].shape[1]
    base = torch.arange(width) if start is None else start
    if site.heads is not None:
        per_kv = geometry.num_heads // geometry.num_kv_heads
        block_size, tie = geometry.head_dim, [h // per_kv for h in range(geometry.num_heads)]
    else:
        if width % groups:
            raise ValueError(f"{site.name}: width {width} does not split into {groups} permutation groups")
        block_size = width // groups
        if start is not None and block and block_size % block == 0:
            block_size = block
        tie = None
    init = None if start is None else torch.arange(width)
    linears = {name: (weights[name].detach().float()[:, base], scores[name][:, base]) for name in site.linears}
    return SiteSpec(site.name, linears, block_size, tie, init), base


def _specs(sites, weights, scores, init, config, geometry, prefix: str = "") -> tuple[list[SiteSpec], list[torch.Tensor]]:
    """Site specs (linear names prefixed by ``prefix``) and their base permutations."""
    specs, bases = [], []
    for site in sites:
        spec, base = site_spec(site, weights, scores, init[site.name], config.learn_block, config.perm_groups, geometry)
        linears = {prefix + name: value for name, value in spec.linears.items()}
        specs.append(SiteSpec(prefix + spec.name, linears, spec.block_size, spec.tie, spec.init_perm))
        bases.append(base)
    return specs, bases


def _parameter_map(module: nn.Module, specs: list[SiteSpec], bases: list[torch.Tensor]):
    """A function from the learner's effective weights (in each site's base order) to the parameters
    ``functional_call(module, ...)`` takes: original column order, Conv1D transposed, the module's dtype."""
    inverse = {name: torch.argsort(base) for spec, base in zip(specs, bases) for name in spec.linears}
    modules = {name: module.get_submodule(name) for name in inverse}

    def parameters(effective: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, weight in effective.items():
            weight = weight[:, inverse[name]]
            if isinstance(modules[name], Conv1D):
                weight = weight.T
            out[f"{name}.weight"] = weight.to(modules[name].weight.dtype)
        return out

    return parameters


def _summary(history: dict) -> dict:
    summary = {k: history[k] for k in ("init_eval", "best_eval", "best_step", "improved", "seconds")}
    summary["loss_first"], summary["loss_last"] = history["loss"][0], history["loss"][-1]
    return summary


def learn_block_permutations(
    block: nn.Module, sites: list, weights: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
    init: dict[str, torch.Tensor | None], n: int, m: int, config, geometry: AttentionGeometry, data,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Learn every site's permutation of ``block`` so the pruned block reproduces the dense outputs.

    Training draws mini-batches of ``config.learn_batch_size()`` windows (seeded); the hard permutations are
    judged on the first ``EVAL_SAMPLES`` windows and the best judged set is returned (never worse than
    the start).
    """
    specs, bases = _specs(sites, weights, scores, init, config, geometry)
    parameters = _parameter_map(block, specs, bases)
    generator = torch.Generator().manual_seed(config.seed)
    count = data.inputs.shape[0]

    def run(effective: dict[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        out = block_output(functional_call(block, parameters(effective), (data.inputs[index],), data.kwargs))
        return distillation_loss(config.learn_loss, out.float(), data.targets[index].float())

    def train_loss(effective):
        return run(effective, torch.randint(0, count, (config.learn_batch_size(),), generator=generator))

    fixed = torch.arange(min(EVAL_SAMPLES, count))

    def judge(effective):
        return run(effective, fixed)

    learn_config = LearnConfig(**{"seed": config.seed, **config.learn})
    learned, history = learn_permutations(list(specs), train_loss, n, m, learn_config, eval_fn=judge, progress=False)
    perms = {spec.name: base[learned[spec.name]] for spec, base in zip(specs, bases)}
    return perms, _summary(history)


def learn_model_permutations(
    model: nn.Module, plans: list, n: int, m: int, config, geometry: AttentionGeometry, windows: torch.Tensor,
    progress: bool = True,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Learn every trainable site of every block at once (``e2e``) on the calibration ``windows``.

    ``plans`` are the blocks' :class:`permsparse.pruning.BlockPlan` (name, weights, scores, sites and
    searched start permutations). The objective is ``CE + alpha * mean_l distill(h_l, h_l^dense)``
    (``config.learn_ce``, ``config.learn_alpha``, ``config.learn_loss``) on mini-batches of
    ``config.learn_batch_size()`` windows; the hard permutations are judged on the first ``EVAL_SAMPLES``
    windows and the best judged set is kept. Returns the permutations per block name and a summary.
    """
    specs, bases, owners = [], [], []
    for plan in plans:
        block_specs, block_bases = _specs(plan.trainable, plan.weights, plan.scores, plan.perms, config, geometry,
                                          prefix=f"{plan.name}.")
        specs += block_specs
        bases += block_bases
        owners += [(plan.name, site.name) for site in plan.trainable]
    parameters = _parameter_map(model, specs, bases)
    distill = config.learn_alpha > 0
    windows = windows.to(next(model.parameters()).device)
    count = windows.shape[0]
    teacher = None
    if distill:  # the dense model's block outputs, once: the weights are not changed until training ends
        with torch.no_grad():
            teacher = torch.cat([
                torch.stack(model(windows[i:i + config.batch_size], output_hidden_states=True,
                                  use_cache=False).hidden_states[1:], 1)
                for i in range(0, count, config.batch_size)
            ])
    generator = torch.Generator().manual_seed(config.seed)

    def objective(effective: dict[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        ids = windows[index]
        out = functional_call(model, parameters(effective), (ids,), {"output_hidden_states": distill, "use_cache": False})
        loss = torch.zeros(())
        if config.learn_ce:
            logits = out.logits[:, :-1].float()
            loss = loss + F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        if distill:
            layers = [distillation_loss(config.learn_loss, h.float(), t.float())
                      for h, t in zip(out.hidden_states[1:], teacher[index].unbind(1))]
            loss = loss + config.learn_alpha * torch.stack(layers).mean()
        return loss

    fixed = torch.arange(min(EVAL_SAMPLES, count))
    learn_config = LearnConfig(**{"seed": config.seed, **config.learn})
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # frozen: no gradient is computed or kept for any model weight
        p.requires_grad_(False)
    try:
        learned, history = learn_permutations(
            specs, lambda w: objective(w, torch.randint(0, count, (config.learn_batch_size(),), generator=generator)),
            n, m, learn_config, eval_fn=lambda w: objective(w, fixed), progress=progress,
        )
    finally:
        for p in trainable:
            p.requires_grad_(True)
    perms: dict[str, dict[str, torch.Tensor]] = {}
    for spec, base, (block, site) in zip(specs, bases, owners):
        perms.setdefault(block, {})[site] = base[learned[spec.name]]
    return perms, _summary(history)
