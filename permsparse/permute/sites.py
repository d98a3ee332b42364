"""Permutation sites: which linears share one input permutation, and searching one site.

A site is the unit a permutation is chosen for. Under ``per-linear`` binding every linear is its own
site; under ``shared`` the linears that read one input tensor (q/k/v, gate/up) form one site and the
attention output's permutation stays within heads, identical for the query heads of one kv head (so it
folds into the value rows); under ``global`` the residual-stream readers use one hidden permutation of
the whole model, chosen once (docs/method.md, "Binding").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..discover.adapters import AttentionGeometry, BlockKind
from ..sparsity.statistics import InputStats
from ..config import PruneConfig
from .search import find_permutation


@dataclass(frozen=True)
class Site:
    """Linears (block-relative names) whose input columns share one permutation.

    ``heads`` keeps the permutation within attention heads (tied per kv group); ``hidden`` marks a
    reader of the residual stream under global binding, whose permutation is the model's hidden one.
    """

    name: str
    linears: tuple[str, ...]
    heads: AttentionGeometry | None = None
    hidden: bool = False


def sites_for_group(group: tuple[str, ...], binding: str, kind: BlockKind, geometry: AttentionGeometry) -> list[Site]:
    """The permutation sites of one input group (linears reading one tensor, in a block of ``kind``) under
    ``binding``; ``geometry`` is the model's attention geometry."""
    if binding == "per-linear":
        return [Site(name, (name,)) for name in group]
    heads = kind.attention(geometry) if group == (kind.attn_output,) else None
    hidden = binding == "global" and all(name in kind.residual_readers for name in group)
    return [Site(group[0], group, heads, hidden)]


def search_site(site: Site, scores: list[torch.Tensor], weights: list[torch.Tensor], stats: InputStats | None,
                config: PruneConfig) -> torch.Tensor:
    """One site's permutation by the config's search (a learned permutation's warm start): the linears'
    scores (and weights) are stacked by rows, so they share it; a head-constrained site is searched head
    by head, one search per kv group. ``stats`` gives the Gram and drift matrices the output search needs."""
    method, (n, m), seed = config.start, config.nm, config.calibration.seed
    chunks = config.permutation.chunks if config.learned is None else 1
    gram, drift = (None, None) if stats is None else (stats.gram, stats.drift)
    width = scores[0].shape[1]
    if method == "none":
        return torch.arange(width)
    if site.heads is None:
        return find_permutation(torch.cat(scores), n, m, method, weight=torch.cat(weights), gram=gram, drift=drift,
                                chunks=chunks, seed=seed)
    geo, hd = site.heads, site.heads.head_dim
    if hd % m:
        raise ValueError(f"{site.name}: head_dim {hd} is not divisible by M={m}; use --binding per-linear")
    per_kv = geo.num_heads // geo.num_kv_heads
    perm = torch.empty(width, dtype=torch.long)
    for kv in range(geo.num_kv_heads):
        heads = range(kv * per_kv, (kv + 1) * per_kv)
        cols = [slice(h * hd, (h + 1) * hd) for h in heads]

        def per_head(x):
            return None if x is None else torch.stack([x[c, c] for _ in scores for c in cols])

        p = find_permutation(torch.cat([s[:, c] for s in scores for c in cols]), n, m, method,
                             weight=torch.cat([w[:, c] for w in weights for c in cols]), gram=per_head(gram),
                             drift=per_head(drift), seed=seed)
        for h in heads:
            perm[h * hd:(h + 1) * hd] = h * hd + p
    return perm
