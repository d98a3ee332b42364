"""What a pruned model is trained towards: the dense model's outputs, and optionally the text's tokens.

The objective is ``ce * CE + kl * KL + hidden * mean_l dist(h_l, h_l^dense)``: the pruned model's
next-token cross-entropy on the calibration windows, the KL divergence of its next-token distributions
from the dense model's, and the distance of every block's output to the dense model's. An image
classifier's cross-entropy is that of its class logits on the labels of the calibration images, and its
KL that of its class distribution from the dense model's. A model without either head (an encoder, a
vision tower) has no output distribution: the KL's place is taken by what its users read, its final
hidden states, as the mean cosine distance of every token's to the dense model's (the measure
:func:`permsparse.evaluate.measures.embedding_similarity` reports), and it has no cross-entropy
(:func:`objective`).

Two trainers share it: the learned permutation (:mod:`permsparse.permute.learned`, only cost matrices
train) and the distillation of the kept weights (:mod:`permsparse.train.distill`, masks fixed). Each passes
its config, which carries the weights ``ce``, ``kl``, ``hidden`` and the distance ``hidden_loss``
(:class:`Weights`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Protocol, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..run import distributed
from ..discover.adapters import replaced_weights
from ..discover import model_inputs
from ..evaluate.measures import next_token_kl, next_token_nll
from ..data.images import is_classifier


class Weights(Protocol):
    """The objective's weights, as :class:`permsparse.Learned` and :class:`permsparse.Distill` carry them."""

    ce: float
    kl: float
    hidden: float
    hidden_loss: str


W = TypeVar("W", bound=Weights)


@dataclass
class Terms:
    """Sums that make up the objective over some windows; terms of disjoint batches add up, so the
    judgment over many windows is computed batch by batch and equals the one over all at once."""

    nll: Tensor = field(default_factory=lambda: torch.zeros(()))
    tokens: int = 0
    kl: Tensor = field(default_factory=lambda: torch.zeros(()))
    positions: int = 0
    hidden_num: Tensor = field(default_factory=lambda: torch.zeros(()))
    hidden_den: Tensor = field(default_factory=lambda: torch.zeros(()))

    def __add__(self, other: "Terms") -> "Terms":
        return Terms(self.nll + other.nll, self.tokens + other.tokens, self.kl + other.kl,
                     self.positions + other.positions, self.hidden_num + other.hidden_num,
                     self.hidden_den + other.hidden_den)

    def reduced(self) -> "Terms":
        """The terms summed over every process's windows (detached): those of the global batch."""
        sums = [distributed.sum_(t.detach().double().clone()) for t in (self.nll, self.kl, self.hidden_num,
                                                                           self.hidden_den)]
        counts = distributed.sum_(torch.tensor([self.tokens, self.positions], dtype=torch.float64))
        return Terms(sums[0], int(counts[0]), sums[1], int(counts[1]), sums[2], sums[3])

    def global_loss(self, weights: Weights) -> Tensor:
        """The loss of the global batch (every process's windows), with a gradient that is this
        process's share: summed over the processes the gradients are the global loss's gradient.

        Each term is a ratio of sums (NLL over tokens, distance over target power), so the share is its
        first-order part, ``d/dnum = 1/den_total`` and ``d/dden = -num_total/den_total^2``; with one
        process this is the loss itself.
        """
        if not distributed.active():
            return self.value(weights)
        total = self.reduced()
        den = total.hidden_den.float().clamp_min(1e-12)
        share = _weighted(weights, lambda: self.nll / max(total.tokens, 1), lambda: self.kl / max(total.positions, 1),
                          lambda: (self.hidden_num / den - total.hidden_num.float() * self.hidden_den / den**2).mean(),
                          self.nll.device)
        return share + (total.value(weights).float() - share).detach()

    def value(self, weights: Weights) -> Tensor:
        return _weighted(weights, lambda: self.nll / max(self.tokens, 1), lambda: self.kl / max(self.positions, 1),
                         lambda: (self.hidden_num / self.hidden_den.clamp_min(1e-12)).mean(), self.nll.device)


def _weighted(weights: Weights, ce, kl, hidden, device) -> Tensor:
    """``ce * CE + kl * KL + hidden * distance``, each term computed (by its function) only if weighted."""
    loss = torch.zeros((), device=device)
    for weight, term in ((weights.ce, ce), (weights.kl, kl), (weights.hidden, hidden)):
        if weight > 0:
            loss = loss + weight * term()
    return loss


def hidden_distance(kind: str, output: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """``(numerator, denominator)`` of the scale-free distance of a block's output to the dense one.

    ``mse``: squared error over the target's power; ``cosine``: mean of ``1 - cos`` over tokens;
    ``smoothl1``: Smooth-L1 of both scaled by the target's mean magnitude, averaged.
    """
    output, target = output.float(), target.float()
    if kind == "mse":
        return (output - target).pow(2).sum(), target.pow(2).sum()
    if kind == "cosine":
        cos = F.cosine_similarity(output, target, dim=-1)
        return (1 - cos).sum(), torch.tensor(float(cos.numel()), device=cos.device)
    if kind == "smoothl1":
        scale = target.abs().mean().clamp_min(1e-12)
        return (F.smooth_l1_loss(output / scale, target / scale, reduction="sum"),
                torch.tensor(float(target.numel()), device=target.device))
    raise ValueError(f"unknown hidden loss {kind!r}")


def objective(model: nn.Module, weights: W) -> W:
    """The objective weights ``model`` trains on: as configured for a model with an LM head or an image
    classifier. For one without either (an encoder), ``kl`` weighs the distance of its final hidden states
    and ``hidden`` that of every block's output; the default CE weight is dropped and any other refused
    (the cross-entropy needs an output distribution)."""
    if model.get_output_embeddings() is not None or is_classifier(model):
        return weights
    defaults = {f.name: f.default for f in fields(type(weights))}
    kind, what = type(model).__name__, type(weights).__name__
    if weights.ce not in (0.0, defaults["ce"]):
        raise ValueError(f"{kind} has no LM head, so no cross-entropy: the {what} objective can only distil its "
                         "final hidden states (kl) and its blocks' outputs (hidden); set its ce weight to 0")
    if weights.hidden <= 0 and weights.kl <= 0:
        raise ValueError(f"{kind} has no LM head: the {what} objective distils its final hidden states (kl) and "
                         "its blocks' outputs (hidden); give one of them a weight above 0")
    return replace(weights, ce=0.0)


@dataclass
class DenseStates:
    """What the objective needs of the dense model on a batch: block outputs and final hidden states."""

    blocks: tuple[Tensor, ...] | None
    final: Tensor | None


@torch.no_grad()
def dense_states(teacher: nn.Module, ids: Tensor, weights: Weights) -> DenseStates:
    """The dense model's outputs on ``ids`` that the objective distils towards (None where unused): block
    outputs, and the final hidden states (an image classifier: its class logits)."""
    if weights.hidden <= 0 and weights.kl <= 0:
        return DenseStates(None, None)
    if is_classifier(teacher):
        out = teacher(**model_inputs(teacher, ids), output_hidden_states=weights.hidden > 0)
        return DenseStates(out.hidden_states[1:] if weights.hidden > 0 else None,
                           out.logits if weights.kl > 0 else None)
    out = teacher.base_model(ids, output_hidden_states=weights.hidden > 0, use_cache=False)
    return DenseStates(out.hidden_states[1:] if weights.hidden > 0 else None,
                       out.last_hidden_state if weights.kl > 0 else None)


def _hidden_terms(terms: Terms, hidden_states, weights: Weights, dense: DenseStates) -> Terms:
    if dense.blocks is not None:
        pairs = [hidden_distance(weights.hidden_loss, h, t) for h, t in zip(hidden_states[1:], dense.blocks)]
        terms.hidden_num = torch.stack([p[0] for p in pairs])
        terms.hidden_den = torch.stack([p[1] for p in pairs])
    return terms


def classifier_terms(student: nn.Module, pixels: Tensor, labels: Tensor | None, weights: Weights,
                     dense: DenseStates) -> Terms:
    """The objective's terms of the image classifier ``student`` on ``pixels``: the cross-entropy of its
    class logits on ``labels``, the KL divergence of its class distribution from the dense model's, and
    the distance of every block's output to the dense model's."""
    out = student(**model_inputs(student, pixels), output_hidden_states=dense.blocks is not None)
    terms = Terms()
    if weights.ce > 0:
        if labels is None:
            raise ValueError(f"{type(student).__name__}: the cross-entropy needs the labels of the calibration images")
        terms.nll = F.cross_entropy(out.logits.float(), labels.to(out.logits.device), reduction="sum")
        terms.tokens = len(labels)
    if dense.final is not None:
        log_p, log_q = F.log_softmax(dense.final.float(), dim=-1), F.log_softmax(out.logits.float(), dim=-1)
        terms.kl = (log_p.exp() * (log_p - log_q)).sum()
        terms.positions = len(pixels)
    return _hidden_terms(terms, out.hidden_states, weights, dense)


def model_terms(student: nn.Module, ids: Tensor, weights: Weights, dense: DenseStates,
                labels: Tensor | None = None) -> Terms:
    """The objective's terms of the causal LM ``student`` on ``ids`` (an image classifier: of
    :func:`classifier_terms` on images and their ``labels``), against the dense model's outputs ``dense``
    (:func:`dense_states`, computed before the student's weights are replaced)."""
    if is_classifier(student):
        return classifier_terms(student, ids, labels, weights, dense)
    out = student.base_model(ids, output_hidden_states=dense.blocks is not None, use_cache=False)
    head = student.get_output_embeddings()
    terms = Terms()
    if weights.ce > 0:
        terms.nll = next_token_nll(head, out.last_hidden_state, ids)
        terms.tokens = ids[:, 1:].numel()
    if dense.final is not None and head is None:  # an encoder: the distance of what its users read
        terms.kl, count = hidden_distance("cosine", out.last_hidden_state, dense.final)
        terms.positions = int(count)
    elif dense.final is not None:
        terms.kl = next_token_kl(head, out.last_hidden_state, dense.final)
        terms.positions = ids.numel()
    return _hidden_terms(terms, out.hidden_states, weights, dense)


@torch.no_grad()
def judge_model(student: nn.Module, teacher: nn.Module, windows: Tensor, weights: Weights, batch: int,
                replaced: dict[str, Tensor] | None = None, labels: Tensor | None = None,
                cache: list[DenseStates] | None = None) -> float:
    """The objective of ``student`` (with the ``replaced`` linear weights, if given) against ``teacher`` on
    ``windows`` (the held-out set, with their ``labels`` for an image classifier), ``batch`` windows at a
    time, each process on its share. The two may be one module. ``cache``, if given, keeps the teacher's
    states of each batch after the first call (an empty list to start), so repeated judgments run the
    teacher once."""
    total = Terms()
    mine = distributed.shard(windows)
    mine_labels = None if labels is None else distributed.shard(labels)
    for k, i in enumerate(range(0, mine.shape[0], batch)):
        ids = mine[i:i + batch]
        batch_labels = None if mine_labels is None else mine_labels[i:i + batch]
        if cache is not None and k < len(cache):
            dense = cache[k]
        else:
            dense = dense_states(teacher, ids, weights)
            if cache is not None:
                cache.append(dense)
        with replaced_weights(student, replaced or {}):
            total = total + model_terms(student, ids, weights, dense, batch_labels)
    return float((total.reduced() if distributed.active() else total).value(weights))
