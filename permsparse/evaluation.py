"""Perplexity by the standard protocol (method.md §5).

The evaluation text is tokenised once, cut into non-overlapping windows of ``seqlen`` (tail dropped),
each window scored alone, and ``ppl = exp(mean NLL)`` over all predicted tokens.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import data
from .adapters import adapter_for


@dataclass
class Perplexity:
    ppl: float
    nll: float
    seqlen: int
    windows: int
    tokens: int
    source: str
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def eval_tokens(tokenizer, source: str = "wikitext2") -> torch.Tensor:
    """The evaluation text's token ids, tokenised once."""
    return data.tokenize(tokenizer, data.load_text(source))


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer, *, seqlen: int, windows: int | None = None, source: str = "wikitext2",
    ids: torch.Tensor | None = None, batch_size: int = 4, progress: bool = True,
) -> Perplexity:
    """WikiText-2 (or ``source``) perplexity of ``model``; ``windows`` limits to the first K windows.

    Pass ``ids`` (from :func:`eval_tokens`) to score several models without re-tokenising.
    """
    start = time.perf_counter()
    if ids is None:
        ids = eval_tokens(tokenizer, source)
    bos = tokenizer.bos_token_id if adapter_for(model).needs_bos else None
    batches = data.eval_windows(ids, seqlen, windows, bos)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for i in tqdm(range(0, len(batches), batch_size), desc=f"perplexity (seqlen {seqlen})", disable=not progress):
        batch = batches[i : i + batch_size].to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        if not torch.isfinite(nll):
            raise FloatingPointError("non-finite loss during evaluation: the model produces NaN/Inf logits")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    return Perplexity(math.exp(mean), mean, seqlen, len(batches), total_tokens, source, time.perf_counter() - start)
