"""The front door of the permutation searches: one call, a method name, the host scores.

Methods (docs/method.md):

- ``none``: the identity, the baseline every other method is measured against.
- ``cp``: Pool & Yu's channel swaps (:mod:`.cp`).
- ``ria``: RIA's bands and per-slot assignment (:mod:`.ria`).
- ``output``: from ``ria``, swaps that lower the linear's true output error (:mod:`.output`).
"""
from __future__ import annotations

import inspect

import torch

from .cp import cp
from .output import output
from .ria import ria

SEARCHES = {"none": None, "cp": cp, "ria": ria, "output": output}


def needs_gram(method: str) -> bool:
    """Whether ``method`` needs ``weight`` and the input Gram matrix (only the output-aware search)."""
    return method == "output"


def find_permutation(scores: torch.Tensor, n: int, m: int, method: str, *,
                     weight: torch.Tensor | None = None, gram: torch.Tensor | None = None,
                     drift: torch.Tensor | None = None, chunks: int = 1, seed: int = 0,
                     **options) -> torch.Tensor:
    """Permutation ``p`` (``LongTensor`` of length ``in``) of the input channels of ``scores``.

    ``scores`` is ``(rows, in)`` and may stack several weights that read the same input. The N:M mask is
    then chosen on ``scores[:, p]``. ``chunks > 1`` cuts the channels into that many contiguous chunks,
    each a multiple of ``m``, searched independently (``p`` keeps every channel inside its chunk): this
    bounds the cost on very wide layers. ``output`` needs ``weight`` (shape of ``scores``) and ``gram``
    (``(in, in)``, or ``(k, in, in)`` where row block ``i`` of ``weight`` reads ``gram[i]``); with
    ``drift`` (same shape, ``(X_dense - X)^T X``) it aims at the dense model's outputs instead of
    ``W``'s outputs on the same inputs (see :class:`permsparse.sparsity.statistics.InputStats`).
    ``options`` go to the method (``cp``: rounds, perturbations, kick, candidates; ``ria``: rounds;
    ``output``: rounds, pairs, checks, proxy_weight). The same ``seed`` gives the same ``p``.
    """
    if not 0 < n < m:
        raise ValueError(f"pattern {n}:{m} is invalid: need 0 < N < M")
    scores, weight, gram, drift = (None if x is None else x.detach() for x in (scores, weight, gram, drift))
    if method not in SEARCHES:
        raise ValueError(f"unknown permutation method {method!r}; choose one of {', '.join(SEARCHES)}")
    if scores.dim() != 2:
        raise ValueError(f"scores must be (rows, in), got shape {tuple(scores.shape)}")
    cols = scores.shape[1]
    if cols % m:
        raise ValueError(f"{cols} input channels are not divisible by M={m}")
    if chunks < 1 or cols % chunks or (cols // chunks) % m:
        raise ValueError(f"chunks={chunks} must split {cols} channels into equal parts that are multiples of M={m}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    gen = torch.Generator().manual_seed(seed)
    if method == "none":
        if options:
            raise ValueError(f"method 'none' takes no options, got {sorted(options)}")
        return torch.arange(cols, device=scores.device)
    if method == "output":
        if weight is None or gram is None:
            raise ValueError("method 'output' needs both weight and gram")
        if weight.shape != scores.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} differs from scores {tuple(scores.shape)}")
        start = find_permutation(scores, n, m, "ria", chunks=chunks, seed=seed)
        return _call(output, scores, n, m, gen, options, start=start, chunk_groups=cols // chunks // m,
                     weight=weight, gram=gram, drift=drift)
    width = cols // chunks
    parts = [_call(SEARCHES[method], scores[:, c:c + width], n, m, gen, options) + c for c in range(0, cols, width)]
    return torch.cat(parts)


def _call(search, scores, n, m, gen, options, **fixed):
    """Run ``search``, turning an unknown option into a clear ValueError rather than a TypeError."""
    known = [k for k, v in inspect.signature(search).parameters.items() if v.kind is v.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for this method; known: {known}")
    return search(scores, n, m, gen, **fixed, **options)
