"""Folding input permutations into the model, so masked N:M weights become N:M in storage order.

A pruned linear is stored "masked": ``W * unpermute(mask)`` in the original column order, where the mask
was chosen on ``S[:, p]``. It is N:M only *through* ``p``. Folding stores ``W[:, p]`` instead and permutes
whatever produces that input the same way, so the model computes exactly the same function
(docs/method.md, "Binding"):

- a linear fed by other linears through channel-wise operations only (LLaMA ``down_proj`` <- gate/up,
  ``o_proj`` <- v): permute the producers' output rows (and biases), and the parameters of a norm between
  them (MLA's ``q_a_layernorm``); consumers of one input fold only together, with one permutation, the
  producers moved once. For the attention output this is
  exact only if ``p`` keeps every channel within its head and is identical for all query heads that
  share one kv head (their values come from the same rows of v);
- a linear reading the residual stream (through a norm): exact only with one global permutation of the
  hidden dimension, applied to every embedding, norm, reader and writer of the stream and to the LM head
  (:func:`global_hidden_permutation`).

Which linears feed which, and what makes up the residual stream, is the adapter's knowledge, discovered
from the model and verified on a forward pass (:mod:`permsparse.discover`); nothing here names a model
family. A model whose residual stream cannot be permuted without changing its output (an encoder, whose
output is the final hidden state) keeps its residual readers unfolded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..discover.adapters import adapter_for, linear_weight
from ..discover import (experts_as_linears, find_towers, head_permutation, hidden_size, optional_submodule, permute_columns,
                        permute_rows, permute_stream, permute_vector, stream_parts)
from ..sparsity.masks import as_permutation
from ..report import PruneReport
from .record import FoldRecord, Layout

__all__ = ["FoldResult", "fold_for_export", "fold_permutations", "global_hidden_permutation", "head_permutation",
           "masked_layouts", "permute_columns"]


@dataclass
class FoldResult:
    """What :func:`fold_permutations` did: the linears folded, and why the others were not."""

    folded: list[str]
    not_folded: dict[str, str]
    hidden_perm_applied: bool


@torch.no_grad()
def global_hidden_permutation(model: nn.Module, perm: torch.Tensor) -> list[str]:
    """Permute the hidden dimension of the whole residual stream in place; the function is unchanged.

    New hidden channel j holds old channel ``perm[j]``: embedding columns, every norm's parameters, the
    rows (and biases) of every writer, the columns of every reader, the final norm and the LM head (or an
    input and output projection when present). A tensor shared by several modules (tied embeddings and LM
    head) is permuted once. Returns the names of the modules touched. A model whose output would change
    (an encoder, whose output is the final hidden state) is refused.
    """
    adapter = adapter_for(model)
    if adapter.stream_problem:
        raise ValueError(f"cannot permute the residual stream of {adapter.name}: {adapter.stream_problem}")
    return permute_stream(model, adapter, as_permutation(perm, hidden_size(model, adapter), "hidden permutation"))


@torch.no_grad()
def fold_permutations(
    model: nn.Module, perms: dict[str, torch.Tensor], *, hidden_perm: torch.Tensor | None = None
) -> FoldResult:
    """Fold every exact input permutation into ``model`` in place; report what folded and why not.

    ``perms`` maps full linear names to the input permutation ``p`` through which each linear's mask was
    chosen; those of a vision-language model's vision tower fold within that tower. A linear fed by producers (adapter ``producers``) gets ``W[:, p]`` and its producers' rows
    permuted alike, when exact. A residual-stream reader folds only when ``hidden_perm`` is given and
    equals its ``p``; with ``hidden_perm`` the whole stream is permuted first
    (:func:`global_hidden_permutation`), for every reader, listed in ``perms`` or not.

    A folded linear stores its weight in permuted order, so a mask chosen through ``p`` is N:M in storage
    order. A linear that is not folded is left as it was (apart from the global permutation, which
    leaves every reader exact).
    """
    towers = find_towers(model)
    vision = {} if towers is None else {n: p for n, p in perms.items() if n.startswith(towers.vision + ".")}
    if vision:  # the vision tower folds as the model of its own it was pruned as
        prefix = towers.vision + "."
        inner = fold_permutations(model.get_submodule(towers.vision),
                                  {n.removeprefix(prefix): p for n, p in vision.items()})
        outer = fold_permutations(model, {n: p for n, p in perms.items() if n not in vision}, hidden_perm=hidden_perm)
        order = {name: i for i, name in enumerate(perms)}
        return FoldResult(sorted(outer.folded + [prefix + n for n in inner.folded], key=order.__getitem__),
                          {**outer.not_folded, **{prefix + n: why for n, why in inner.not_folded.items()}},
                          outer.hidden_perm_applied)
    adapter = adapter_for(model)
    geometry = adapter.attention(model.config)
    blocks = adapter.blocks(model)
    readers = ({name for name, _ in stream_parts(model, adapter)["readers"]}
               if any(kind.residual_writers for kind in adapter.kinds) else set())
    folded: list[str] = []
    not_folded: dict[str, str] = {}
    folds: list[tuple[str, nn.Module, torch.Tensor, list[tuple[nn.Module, torch.Tensor, torch.Tensor | None]]]] = []

    hidden = None if hidden_perm is None else as_permutation(hidden_perm, hidden_size(model, adapter), "hidden_perm")

    for full, perm in perms.items():
        module = optional_submodule(model, full)
        if module is None:
            not_folded[full] = "no such linear"
            continue
        width = linear_weight(module).shape[1]
        try:
            p = as_permutation(perm, width)
        except ValueError:
            not_folded[full] = f"not a permutation of its {width} input channels"
            continue
        block_index, rel = None, full
        if full.startswith(adapter.blocks_path + "."):
            index, _, rel = full[len(adapter.blocks_path) + 1 :].partition(".")
            block_index = int(index) if index.isdigit() and int(index) < len(blocks) else None
        kind = adapter.kind(block_index) if block_index is not None else None
        producers = kind.producers_of(rel) if kind is not None else ()
        if producers:
            row_perm, reason = p, ""
            if rel == kind.attn_output:
                row_perm, reason = head_permutation(p, kind.attention(geometry))
            if row_perm is None:
                not_folded[full] = f"{rel}: {reason}"
                continue
            prefix = f"{adapter.blocks_path}.{block_index}."
            sharing = [c for c, slices in kind.producers if slices == producers]  # consumers of one input
            apart = [c for c in sharing if c != rel and (prefix + c not in perms
                                                         or not torch.equal(torch.as_tensor(perms[prefix + c]).cpu(),
                                                                            p.cpu()))]
            if apart:
                not_folded[full] = f"{rel}: its producers also feed {apart[0]}, which is not permuted alike"
                continue
            edits, problem = [], ""
            for out in producers if sharing[0] == rel else ():  # the producers move once, with the first
                producer = model.get_submodule(prefix + out.linear)
                rows = out.rows(linear_weight(producer).shape[0])
                if rows.numel() != row_perm.numel():
                    problem = f"{rel}: producer {out.describe()} has {rows.numel()} rows, not {row_perm.numel()}"
                    break
                edits.append((producer, rows, row_perm))
            edits += [(model.get_submodule(prefix + norm), None, row_perm) for norm in kind.norms_of(rel)
                      if sharing[0] == rel]
            if problem:
                not_folded[full] = problem
                continue
            folds.append((full, module, p, edits))
        elif full in readers:
            if hidden is None:
                not_folded[full] = f"{rel}: residual reader, no global permutation"
            elif adapter.stream_problem:
                not_folded[full] = f"{rel}: residual reader, the stream cannot be permuted: {adapter.stream_problem}"
            elif not torch.equal(p, hidden):
                not_folded[full] = f"{rel}: residual reader, permutation differs from the global hidden permutation"
            else:
                folded.append(full)
        else:
            unfoldable = dict(kind.not_foldable) if kind is not None else {}
            not_folded[full] = f"{rel}: {unfoldable.get(rel, 'no known producer of its input')}"

    applied = hidden is not None and not adapter.stream_problem
    if applied:
        permute_stream(model, adapter, hidden)
    for full, module, p, edits in folds:
        permute_columns(module, p)
        for producer, rows, row_perm in edits:
            if rows is None:  # a norm between the producers and the consumer
                for param in producer.parameters(recurse=False):
                    permute_vector(param, row_perm)
            else:
                permute_rows(producer, row_perm, rows)
        folded.append(full)
    order = {name: i for i, name in enumerate(perms)}
    folded.sort(key=order.__getitem__)
    return FoldResult(folded, not_folded, applied)


@torch.no_grad()
def fold_for_export(model: nn.Module, report: PruneReport, fallback: str = "masked",
                    verified: str = "") -> tuple[dict[str, Layout], FoldRecord]:
    """Fold every exact permutation of a masked pruned model in place; return the layouts and a record.

    Linears whose permutation is the identity need nothing. The others go through
    :func:`fold_permutations` (with the report's global hidden permutation, if any); those that do not
    fold stay masked (``fallback="masked"``) or get their columns permuted and a recorded runtime gather
    (``fallback="gather"``). After a global hidden permutation a reader that did not fold is N:M through
    ``argsort(hidden)[p]``, which is what is recorded. Packed experts are folded as their linears
    (:func:`permsparse.discover.experts_as_linears`); one that does not fold stays masked, since a
    packed tensor takes no runtime gather.
    """
    with experts_as_linears(model) as split:
        return _fold_for_export(model, report, fallback, verified, split)


def _fold_for_export(model: nn.Module, report: PruneReport, fallback: str, verified: str,
                     split: list[str]) -> tuple[dict[str, Layout], FoldRecord]:
    names = [layer.name for layer in report.layers]
    perms = {name: torch.as_tensor(site.perm) for site in report.sites for name in site.linears}
    identity = {name for name, p in perms.items() if torch.equal(p, torch.arange(p.numel()))}
    identity |= {name for name in names if name not in perms}
    hidden = None if report.hidden_perm is None else torch.as_tensor(report.hidden_perm)
    to_fold = {name: perms[name] for name in names if name in perms and (hidden is not None or name not in identity)}
    result = fold_permutations(model, to_fold, hidden_perm=hidden)
    adapter = adapter_for(model)
    applied = result.hidden_perm_applied
    readers = {f"{adapter.blocks_path}.{i}.{rel}" for i in range(len(adapter.blocks(model)))
               for rel in adapter.kind(i).residual_readers} if applied else set()
    inverse = torch.argsort(hidden) if applied else None
    folded = set(result.folded)
    layouts: dict[str, Layout] = {}
    not_folded, gathered, kept_identity = {}, [], []
    for name in names:
        if name in folded:
            layouts[name] = Layout("nm")
            continue
        p = perms.get(name)
        if p is None:
            p = torch.arange(linear_weight(model.get_submodule(name)).shape[1])
        q = inverse[p] if name in readers else p
        if torch.equal(q, torch.arange(q.numel())):
            layouts[name] = Layout("nm")
            kept_identity.append(name)
            continue
        not_folded[name] = result.not_folded.get(name, "permutation not folded")
        if fallback == "gather" and any(name.startswith(experts + ".") for experts in split):
            not_folded[name] += "; kept masked (a packed expert weight takes no runtime gather)"
            layouts[name] = Layout("masked", q.tolist())
        elif fallback == "gather":
            permute_columns(model.get_submodule(name), q)
            layouts[name] = Layout("gather", q.tolist())
            gathered.append(name)
        else:
            layouts[name] = Layout("masked", q.tolist())
    total = max(len(names), 1)
    record = FoldRecord(fallback, [n for n in names if n in folded], kept_identity, not_folded, gathered,
                        result.hidden_perm_applied, (len(folded) + len(kept_identity)) / total,
                        (len(folded) + len(kept_identity) + len(gathered)) / total, verified)
    return layouts, record


def masked_layouts(report: PruneReport, unstructured: bool) -> dict[str, Layout]:
    """Layouts of a masked export: every pruned linear N:M through its permutation (``nm`` where that is
    the identity), or ``unstructured``."""
    if unstructured:
        return {layer.name: Layout("unstructured") for layer in report.layers}
    perms = {name: site.perm for site in report.sites for name in site.linears}
    layouts = {}
    for layer in report.layers:
        perm = perms.get(layer.name)
        identity = perm is None or perm == list(range(len(perm)))
        layouts[layer.name] = Layout("nm") if identity else Layout("masked", perm)
    return layouts
