"""Pruning hosts that also update the weights they keep, one linear layer at a time.

Both take the layer's ``(out, in)`` weight and the calibration Hessian ``H = X^T X`` and minimise the
layer's output error ``||X W^T - X Ŵ^T||^2`` under an N:M (or unstructured, or fixed) mask, optionally
on permuted input columns; both return an :class:`UpdateResult`.

- :func:`sparsegpt`: one left-to-right pass of Optimal Brain Surgeon updates (Frantar & Alistarh 2023).
- :func:`admm`: ADMM with gradual mask selection (Boža 2024); about ten times slower, usually a lower
  error (always on a fixed mask, where it nears the exact least-squares weights).

:mod:`.layer` prunes one linear through a candidate permutation, with or without such an update.
"""
from __future__ import annotations

from typing import Callable

from .admm import admm
from .common import UpdateResult
from .sparsegpt import sparsegpt

UPDATES: dict[str, Callable[..., UpdateResult]] = {"sparsegpt": sparsegpt, "admm": admm}

__all__ = ["UPDATES", "UpdateResult", "admm", "sparsegpt"]
