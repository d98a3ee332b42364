"""Training the learned permutations of one block against the dense block's outputs ("blockwise").

All model weights stay frozen; only the permutation cost matrices train (permsparse.learned). Memory
is one block's, so a 7B model fits where its one-shot pruning does. The pruned block's outputs then
feed the next block, as in one-shot pruning.
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


def learn_block_permutations(
    block: nn.Module, sites: list, weights: dict[str, torch.Tensor], scores: dict[str, torch.Tensor],
    init: dict[str, torch.Tensor | None], n: int, m: int, config, geometry: AttentionGeometry, data,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Learn every site's permutation of ``block`` so the pruned block reproduces the dense outputs.

    Training draws mini-batches of ``config.learn_batch`` windows (seeded); the hard permutations are
    judged on the first ``EVAL_SAMPLES`` windows and the best judged set is returned (never worse than
    the start).
    """
    specs, bases = zip(*[
        site_spec(s, weights, scores, init[s.name], config.learn_block, config.perm_groups, geometry) for s in sites
    ])
    # the learner's weights are in the base order; the block reads them in the original order
    inverse = {name: torch.argsort(base) for spec, base in zip(specs, bases) for name in spec.linears}
    transposed = {name for name in weights if isinstance(block.get_submodule(name), Conv1D)}
    generator = torch.Generator().manual_seed(config.seed)
    count = data.inputs.shape[0]

    def run(effective: dict[str, torch.Tensor], index: torch.Tensor) -> torch.Tensor:
        original = {k: w[:, inverse[k]] for k, w in effective.items()}
        params = {f"{k}.weight": (w.T if k in transposed else w).to(weights[k].dtype) for k, w in original.items()}
        out = block_output(functional_call(block, params, (data.inputs[index],), data.kwargs))
        return distillation_loss(config.learn_loss, out.float(), data.targets[index].float())

    def train_loss(effective):
        return run(effective, torch.randint(0, count, (config.learn_batch,), generator=generator))

    fixed = torch.arange(min(EVAL_SAMPLES, count))

    def judge(effective):
        return run(effective, fixed)

    learn_config = LearnConfig(**{"seed": config.seed, **config.learn})
    learned, history = learn_permutations(list(specs), train_loss, n, m, learn_config, eval_fn=judge, progress=False)
    perms = {spec.name: base[learned[spec.name]] for spec, base in zip(specs, bases)}
    summary = {k: history[k] for k in ("init_eval", "best_eval", "best_step", "improved", "seconds")}
    summary["loss_first"], summary["loss_last"] = history["loss"][0], history["loss"][-1]
    return perms, summary
