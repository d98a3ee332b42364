"""Importance scores ("hosts") that choose which weights an N:M mask keeps.

All scores have the weight's shape ``(out, in)``; ``act_norm`` is the L2 norm of each input channel
over the calibration tokens, ``||X_j||_2``.
"""
from __future__ import annotations

from typing import Callable

import torch

RIA_ALPHA = 0.5


def magnitude(weight: torch.Tensor, act_norm: torch.Tensor | None = None) -> torch.Tensor:
    """``|W|``: needs no calibration data."""
    return weight.abs()


def wanda(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2024): ``|W_ij| * ||X_j||_2``."""
    return weight.abs() * act_norm.reshape(1, -1)


def ria(weight: torch.Tensor, act_norm: torch.Tensor, alpha: float = RIA_ALPHA) -> torch.Tensor:
    """RIA (Zhang et al. 2024): relative importance times ``||X_j||_2 ** alpha``.

    Relative importance is ``|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|`` (column and row sums).
    """
    a = weight.abs()
    col = a.sum(dim=0, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    row = a.sum(dim=1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
    return (a / col + a / row) * act_norm.reshape(1, -1).pow(alpha)


SCORES: dict[str, Callable[..., torch.Tensor]] = {"magnitude": magnitude, "wanda": wanda, "ria": ria}


def compute_score(name: str, weight: torch.Tensor, act_norm: torch.Tensor | None) -> torch.Tensor:
    """Score ``weight`` with the named host; scores needing activations require ``act_norm``."""
    if name not in SCORES:
        raise ValueError(f"unknown score {name!r}; choose one of {', '.join(SCORES)}")
    if name != "magnitude" and act_norm is None:
        raise ValueError(f"score {name!r} needs calibration statistics (act_norm)")
    return SCORES[name](weight.float(), None if act_norm is None else act_norm.float())
