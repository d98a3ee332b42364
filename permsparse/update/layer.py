"""One linear pruned through one candidate permutation: its N:M (or unstructured) mask on the permuted host
score, the relative output errors of that mask and of the identity's, and the update a weight-updating host
makes of the kept weights. Nothing is written into the model here: the pipeline compares candidates first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import PruneConfig
from ..sparsity.masks import nm_mask, permuted_nm_mask, unstructured_mask
from . import UPDATES
from .common import UpdateResult


@dataclass
class SiteLayer:
    """One linear pruned through one candidate permutation, not yet written: its host scores, its mask
    (and the identity's), the relative output errors of both, and the update a weight-updating host made."""

    scores: torch.Tensor
    mask: torch.Tensor
    identity_mask: torch.Tensor | None
    errors: tuple[float | None, float | None]
    update: UpdateResult | None


def prune_layer(config: PruneConfig, weight: torch.Tensor, scores: torch.Tensor, gram: torch.Tensor | None,
                perm: torch.Tensor | None) -> SiteLayer:
    """``weight`` pruned through ``perm`` on its host ``scores`` as ``config`` says, not yet written; ``gram``
    (the input's ``X^T X``, when collected) gives the output errors and a weight-updating host's update."""
    if config.nm is None:
        mask, identity_mask = unstructured_mask(scores, config.density), None
    else:
        mask, identity_mask = permuted_nm_mask(scores, perm, *config.nm), nm_mask(scores, *config.nm)
    if config.updates:  # the masked error of an updated weight means nothing: only the identity's is kept
        identity_error = None if identity_mask is None else relative_error(weight, identity_mask, gram)
        return SiteLayer(scores, mask, identity_mask, (None, identity_error),
                         updated_weight(config, weight, gram, perm, mask))
    errors = (None, None) if gram is None else tuple(None if m is None else relative_error(weight, m, gram)
                                                     for m in (mask, identity_mask))
    return SiteLayer(scores, mask, identity_mask, errors, None)


@torch.no_grad()
def updated_weight(config: PruneConfig, weight: torch.Tensor, gram: torch.Tensor, perm: torch.Tensor | None,
                   mask: torch.Tensor) -> UpdateResult:
    """``weight`` pruned and updated by the config's weight-updating host on ``gram`` (not written back).

    N:M: on the permuted columns, with the host's own mask or ``mask`` (the permutation's) fixed.
    Unstructured: the host's own mask at the config's density.
    """
    algorithm = UPDATES[config.score]
    if config.nm is None:
        return algorithm(weight, gram, density=config.density)
    if config.update_mask == "own":
        return algorithm(weight, gram, *config.nm, perm=perm)
    return algorithm(weight, gram, *config.nm, perm=perm, mask=mask)


def kept_share(scores: torch.Tensor, mask: torch.Tensor) -> float:
    return float((scores * mask).sum() / scores.sum().clamp_min(1e-30))


def relative_error(weight: torch.Tensor, mask: torch.Tensor, gram: torch.Tensor) -> float:
    """Output error of pruning ``weight`` with ``mask``, ``sum_r d_r H d_r^T``, over ``sum_r w_r H w_r^T``."""
    w = weight.double()
    d = w * ~mask
    h = gram.double()
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp_min(1e-30))
