"""Which linears of each block a config prunes: the block's input groups, restricted by ``--include`` and
``--exclude``, less the linears whose input width N:M cannot divide (skipped, with the reason; ``--strict``
refuses them). Weights are checked for NaN/Inf here, before any work.
"""
from __future__ import annotations

import fnmatch
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..discover import Adapter, is_linear, linear_weight

if TYPE_CHECKING:
    from ..config import PruneConfig


def select_targets(model: nn.Module, adapter: Adapter, config: PruneConfig) -> tuple[list[list[tuple[str, ...]]], list[str]]:
    """Per block, the input groups restricted to target linears; and the skipped layers, with reasons.

    Weights are checked for NaN/Inf here, before any work, so a bad checkpoint fails at once.
    """
    m = config.nm[1] if config.nm else None
    per_block, indivisible = [], []
    for i, block in enumerate(adapter.blocks(model)):
        prefix, kind = f"{adapter.blocks_path}.{i}.", adapter.kind(i)
        known = {name for group in kind.input_groups for name in group} | set(kind.routers)
        known |= {part.name.rpartition(".")[0] for part in kind.kept_dense}  # a linear kept dense is not a target
        extra = tuple((name,) for name, mod in block.named_modules() if is_linear(mod) and name not in known)
        groups = []
        for group in tuple(kind.input_groups) + extra:
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
    return per_block, indivisible
