"""Perplexity by the standard protocol (docs/method.md, "Evaluation"), and the similarity of an encoder's
embeddings to the dense model's.

The evaluation text is tokenised once, cut into non-overlapping windows of ``seqlen`` (tail dropped),
each window scored alone, and ``ppl = exp(mean NLL)`` over all predicted tokens. Every window starts with
BOS when the tokenizer adds one (:func:`permsparse.data.text.bos_id`). An encoder has no next-token
distribution: it is judged by the mean cosine between its final hidden states and the dense model's on
the same windows, and, as a sentence encoder is read, by its pooled embeddings of the text's passages
(:func:`sentence_similarity`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data import text as data
from ..run.placement import input_device
from ..run.progress import bar


LOGIT_CHUNK = 2**24  # logits computed at once (floats): positions per chunk = this / (batch * vocab)


@dataclass
class Perplexity:
    """A perplexity and its protocol: the text, the window length and count, the tokens it predicts."""

    ppl: float
    nll: float
    seqlen: int
    windows: int
    tokens: int
    source: str
    seconds: float


def _chunk_nll(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")


def _chunked(fn, lm_head: nn.Module, hidden: torch.Tensor, other: torch.Tensor, length: int) -> torch.Tensor:
    """``sum_chunks fn(lm_head, hidden[:, chunk], other[:, chunk'])`` over chunks of positions, each
    chunk's logits recomputed in the backward pass (with a gradient) instead of stored."""
    step = max(1, LOGIT_CHUNK // (hidden.shape[0] * lm_head.weight.shape[0]))
    total = torch.zeros((), device=hidden.device)
    for s in range(0, length, step):
        h, o = hidden[:, s:s + step], other[:, s:s + step]
        total = total + (checkpoint(fn, lm_head, h, o, use_reentrant=False) if h.requires_grad else fn(lm_head, h, o))
    return total


def _chunk_kl(lm_head: nn.Module, hidden: torch.Tensor, dense_hidden: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        log_p = F.log_softmax(lm_head(dense_hidden).float(), dim=-1)
    log_q = F.log_softmax(lm_head(hidden).float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum()


def next_token_kl(lm_head: nn.Module, hidden: torch.Tensor, dense_hidden: torch.Tensor) -> torch.Tensor:
    """Summed ``KL(dense || pruned)`` of the next-token distributions at every position, from the final
    hidden states of the pruned and the dense model, in chunks of positions (bounded memory)."""
    return _chunked(_chunk_kl, lm_head, hidden, dense_hidden, hidden.shape[1])


def next_token_nll(lm_head: nn.Module, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of ``ids`` from the final hidden states, in chunks of positions.

    Never a whole batch's full-vocabulary logits: with a gradient each chunk's logits are recomputed
    in the backward pass instead of stored.
    """
    return _chunked(_chunk_nll, lm_head, hidden[:, :-1], ids[:, 1:], ids.shape[1] - 1)


def eval_tokens(tokenizer, source: str = "wikitext2") -> torch.Tensor:
    """The evaluation text's token ids, tokenised once (documents joined by EOS, as calibration joins them)."""
    return data.token_stream(tokenizer, source)


@torch.no_grad()
def perplexity(
    model: nn.Module, tokenizer, *, seqlen: int, windows: int | None = None, source: str = "wikitext2",
    ids: torch.Tensor | None = None, batch_size: int = 4, progress: bool = True,
) -> Perplexity:
    """WikiText-2 (or ``source``) perplexity of ``model``; ``windows`` limits to the first K windows.

    Pass ``ids`` (from :func:`eval_tokens`) to score several models without re-tokenising.
    """
    start = time.perf_counter()
    if model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} has no LM head, so no perplexity: use embedding_similarity")
    if ids is None:
        ids = eval_tokens(tokenizer, source)
    batches = data.eval_windows(ids, seqlen, windows, data.bos_id(tokenizer))
    device = input_device(model)  # where the inputs go (an offloaded model's too)
    total_nll, total_tokens = 0.0, 0
    for i in bar(range(0, len(batches), batch_size), desc=f"perplexity (seqlen {seqlen})", disable=not progress):
        batch = batches[i : i + batch_size].to(device)
        hidden = model.base_model(batch, use_cache=False).last_hidden_state
        nll = next_token_nll(model.get_output_embeddings(), hidden, batch)
        if not torch.isfinite(nll):
            raise FloatingPointError("non-finite loss during evaluation: the model produces NaN/Inf logits")
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    return Perplexity(math.exp(mean), mean, seqlen, len(batches), total_tokens, source, time.perf_counter() - start)


@dataclass
class Similarity:
    """Mean cosine between a model's final hidden states and the dense model's, and its protocol."""

    cosine: float
    seqlen: int
    windows: int
    tokens: int
    source: str
    seconds: float


@torch.no_grad()
def embedding_similarity(
    model: nn.Module, dense: nn.Module, tokenizer, *, seqlen: int, windows: int | None = None,
    source: str = "wikitext2", ids: torch.Tensor | None = None, batch_size: int = 4, progress: bool = True,
) -> Similarity:
    """Mean cosine, over every token of the evaluation windows, between the final hidden states of
    ``model`` (pruned) and of ``dense``: how well an encoder's embeddings survive pruning, where
    perplexity does not exist. Windows as :func:`perplexity` cuts them; 1.0 means unchanged."""
    start = time.perf_counter()
    if ids is None:
        ids = eval_tokens(tokenizer, source)
    batches = data.eval_windows(ids, seqlen, windows, data.bos_id(tokenizer))
    device = input_device(model)  # where the inputs go (an offloaded model's too)
    total = 0.0
    for i in bar(range(0, len(batches), batch_size), desc=f"embedding similarity (seqlen {seqlen})",
                 disable=not progress):
        batch = batches[i : i + batch_size].to(device)
        hidden = model.base_model(batch).last_hidden_state.float()
        reference = dense.base_model(batch.to(next(dense.parameters()).device)).last_hidden_state.float()
        total += F.cosine_similarity(hidden, reference.to(device), dim=-1).sum().item()
    tokens = batches.numel()
    return Similarity(total / tokens, seqlen, len(batches), tokens, source, time.perf_counter() - start)


@dataclass
class SentenceSimilarity:
    """How a pruned encoder's sentence embeddings (mean-pooled, as sentence-transformers pools) keep the
    dense model's: their mean cosine, and the share of passages whose nearest other passage stays the one
    the dense model finds (retrieval kept)."""

    cosine: float
    neighbours: float
    sentences: int
    max_length: int
    source: str
    seconds: float


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, texts: list[str], max_length: int, batch_size: int = 32,
                        progress: bool = False) -> torch.Tensor:
    """Unit-length mean-pooled final hidden states of ``texts`` (each cut at ``max_length`` tokens), ``(N, D)``."""
    device = input_device(model)
    out = []
    for i in bar(range(0, len(texts), batch_size), desc="sentence embeddings", disable=not progress):
        rows = tokenizer(texts[i:i + batch_size], truncation=True, max_length=max_length)["input_ids"]
        width = max(map(len, rows))
        ids = torch.tensor([row + [tokenizer.pad_token_id or 0] * (width - len(row)) for row in rows], device=device)
        attention = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows], device=device)
        hidden = model.base_model(input_ids=ids, attention_mask=attention).last_hidden_state.float()
        mask = attention[..., None].to(hidden.dtype)
        out.append(F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1), dim=-1).cpu())
    return torch.cat(out)


def sentence_similarity(model: nn.Module, dense: nn.Module, tokenizer, *, source: str = "wikitext2",
                        sentences: int = 512, max_length: int = 128, batch_size: int = 32,
                        progress: bool = True) -> SentenceSimilarity:
    """:class:`SentenceSimilarity` of ``model`` (pruned) to ``dense`` on the first ``sentences`` passages of
    ``source`` (:func:`permsparse.data.text.sentences`)."""
    start = time.perf_counter()
    texts = data.sentences(source, sentences)
    pruned = sentence_embeddings(model, tokenizer, texts, max_length, batch_size, progress)
    reference = sentence_embeddings(dense, tokenizer, texts, max_length, batch_size, progress)
    cosine = (pruned * reference).sum(-1).mean().item()
    nearest = []
    for embeddings in (pruned, reference):
        scores = embeddings @ embeddings.T
        scores.fill_diagonal_(-float("inf"))
        nearest.append(scores.argmax(-1))
    kept = (nearest[0] == nearest[1]).float().mean().item() if len(texts) > 1 else 1.0
    return SentenceSimilarity(cosine, kept, len(texts), max_length, source, time.perf_counter() - start)
