"""Folding input permutations into the model, so masked N:M weights become N:M in storage order.

A pruned linear is stored "masked": ``W * unpermute(mask)`` in the original column order, where the mask
was chosen on ``S[:, p]``. It is N:M only *through* ``p``. Folding stores ``W[:, p]`` instead and permutes
whatever produces that input the same way, so the model computes exactly the same function
(docs/method.md, "Binding"):

- a linear fed by other linears through channel-wise operations only (LLaMA ``down_proj`` <- gate/up,
  ``o_proj`` <- v): permute the producers' output rows (and biases). For the attention output this is
  exact only if ``p`` keeps every channel within its head and is identical for all query heads that
  share one kv head (their values come from the same rows of v);
- a linear reading the residual stream (through a norm): exact only with one global permutation of the
  hidden dimension, applied to every embedding, norm, reader and writer of the stream and to the LM head
  (:func:`global_hidden_permutation`).

Which linears feed which, and what makes up the residual stream, is the adapter's knowledge
(:mod:`permsparse.adapters`); nothing here names a model family.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import Adapter, AttentionGeometry, adapter_for, linear_weight
from ..masks import as_permutation
from ..report import PruneReport
from .record import FoldRecord, Layout


@dataclass
class FoldResult:
    """What :func:`fold_permutations` did: the linears folded, and why the others were not."""

    folded: list[str]
    not_folded: dict[str, str]
    hidden_perm_applied: bool


def _optional(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule ``name``, or None when the name is empty or the module is absent (or set to None)."""
    if not name:
        return None
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


@torch.no_grad()
def _permute_rows(module: nn.Module, perm: torch.Tensor, start: int = 0) -> None:
    """Reorder output rows ``start .. start+len(perm)`` of a linear (and its bias): new row j = old row perm[j]."""
    weight = linear_weight(module)
    rows = slice(start, start + perm.numel())
    weight[rows] = weight[rows][perm]
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias[rows] = bias[rows][perm]


@torch.no_grad()
def permute_columns(module: nn.Module, perm: torch.Tensor) -> None:
    """Reorder the input columns of a linear: new column j = old column perm[j]."""
    weight = linear_weight(module)
    weight.copy_(weight[:, perm.to(weight.device)])


@torch.no_grad()
def _permute_vector(param: torch.Tensor | None, perm: torch.Tensor) -> None:
    if param is not None:
        param.copy_(param[perm])


def head_permutation(p: torch.Tensor, geometry: AttentionGeometry) -> tuple[torch.Tensor | None, str]:
    """The row permutation of the value projection that realises ``p`` on the attention output.

    ``p`` permutes the ``num_heads * head_dim`` attention output channels. It folds into the value rows
    only if every head's channels stay within that head and all query heads of one kv head use the same
    within-head order. Returns ``(value_row_perm, "")`` or ``(None, reason)``.
    """
    hd, heads, kv = geometry.head_dim, geometry.num_heads, geometry.num_kv_heads
    per_kv = heads // kv
    local = p.view(heads, hd) - (torch.arange(heads) * hd)[:, None]
    if ((local < 0) | (local >= hd)).any():
        return None, "permutation crosses heads"
    local = local.view(kv, per_kv, hd)
    if not (local == local[:, :1]).all():
        return None, "permutation differs between query heads sharing a kv head"
    return (local[:, 0] + (torch.arange(kv) * hd)[:, None]).flatten(), ""


def _stream(model: nn.Module, adapter: Adapter) -> dict[str, list[tuple[str, nn.Module]]]:
    """Every part of the residual stream, by role, as ``(full name, module)`` pairs present in ``model``."""
    parts: dict[str, list[tuple[str, nn.Module]]] = {"embeddings": [], "norms": [], "readers": [], "writers": []}

    def add(role: str, name: str) -> None:
        module = _optional(model, name)
        if module is not None:
            parts[role].append((name, module))

    projection_in = _optional(model, adapter.input_projection)
    if projection_in is not None:
        add("writers", adapter.input_projection)
    else:
        add("embeddings", adapter.token_embedding)
    for name in adapter.position_embeddings:
        add("embeddings", name)
    for i in range(len(adapter.blocks(model))):
        prefix = f"{adapter.blocks_path}.{i}."
        for name in adapter.block_norms:
            add("norms", prefix + name)
        for name in adapter.residual_readers:
            add("readers", prefix + name)
        for name in adapter.residual_writers:
            add("writers", prefix + name)
    for name in adapter.final_norms:
        add("norms", name)
    projection_out = _optional(model, adapter.output_projection)
    add("readers", adapter.output_projection if projection_out is not None else adapter.lm_head)
    return parts


def _hidden_size(model: nn.Module, adapter: Adapter) -> int:
    block = adapter.blocks(model)[0]
    return linear_weight(block.get_submodule(adapter.residual_writers[0])).shape[0]


@torch.no_grad()
def global_hidden_permutation(model: nn.Module, perm: torch.Tensor) -> list[str]:
    """Permute the hidden dimension of the whole residual stream in place; the function is unchanged.

    New hidden channel j holds old channel ``perm[j]``: embedding columns, every norm's weight and bias,
    the rows (and biases) of every writer, the columns of every reader, the final norm and the LM head
    (or OPT's project_in / project_out when present). A tensor shared by several modules (tied
    embeddings and LM head) is permuted once. Returns the names of the modules touched.
    """
    adapter = adapter_for(model)
    if not adapter.residual_writers:
        raise ValueError(f"adapter {adapter.name!r} describes no residual stream; cannot permute it")
    p = as_permutation(perm, _hidden_size(model, adapter), "hidden permutation")
    parts, touched, done = _stream(model, adapter), [], set()

    def once(tensor: torch.Tensor, key: str) -> bool:
        ident = (tensor.data_ptr(), key)
        if ident in done:
            return False
        done.add(ident)
        return True

    for name, module in parts["embeddings"]:
        if once(module.weight, "columns"):
            module.weight.copy_(module.weight[:, p])
        touched.append(name)
    for name, module in parts["norms"]:
        _permute_vector(getattr(module, "weight", None), p)
        _permute_vector(getattr(module, "bias", None), p)
        touched.append(name)
    for name, module in parts["writers"]:
        _permute_rows(module, p)
        touched.append(name)
    for name, module in parts["readers"]:
        if once(linear_weight(module), "columns"):
            permute_columns(module, p)
        touched.append(name)
    return touched


@torch.no_grad()
def fold_permutations(
    model: nn.Module, perms: dict[str, torch.Tensor], *, hidden_perm: torch.Tensor | None = None
) -> FoldResult:
    """Fold every exact input permutation into ``model`` in place; report what folded and why not.

    ``perms`` maps full linear names to the input permutation ``p`` through which each linear's mask was
    chosen. A linear fed by producers (adapter ``producers``) gets ``W[:, p]`` and its producers' rows
    permuted alike, when exact. A residual-stream reader folds only when ``hidden_perm`` is given and
    equals its ``p``; with ``hidden_perm`` the whole stream is permuted first
    (:func:`global_hidden_permutation`), for every reader, listed in ``perms`` or not.

    A folded linear stores its weight in permuted order, so a mask chosen through ``p`` is N:M in storage
    order. A linear that is not folded is left as it was (apart from the global permutation, which
    leaves every reader exact).
    """
    adapter = adapter_for(model)
    geometry = adapter.attention(model.config)
    blocks = adapter.blocks(model)
    readers = {name for name, _ in _stream(model, adapter)["readers"]} if adapter.residual_writers else set()
    folded: list[str] = []
    not_folded: dict[str, str] = {}
    folds: list[tuple[str, nn.Module, torch.Tensor, list[tuple[nn.Module, int, torch.Tensor]]]] = []

    hidden = None if hidden_perm is None else as_permutation(hidden_perm, _hidden_size(model, adapter), "hidden_perm")

    for full, perm in perms.items():
        module = _optional(model, full)
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
        producers = adapter.producers_of(rel) if block_index is not None else ()
        if producers:
            row_perm, reason = p, ""
            if rel == adapter.attn_output:
                row_perm, reason = head_permutation(p, geometry)
            if row_perm is None:
                not_folded[full] = f"{rel}: {reason}"
                continue
            prefix = f"{adapter.blocks_path}.{block_index}."
            edits, problem = [], ""
            for out in producers:
                producer = model.get_submodule(prefix + out.linear)
                rows = linear_weight(producer).shape[0]
                if rows % out.chunks or rows // out.chunks != row_perm.numel():
                    problem = f"{rel}: producer {out.linear} has {rows // out.chunks} rows, not {row_perm.numel()}"
                    break
                edits.append((producer, out.index * (rows // out.chunks), row_perm))
            if problem:
                not_folded[full] = problem
                continue
            folds.append((full, module, p, edits))
        elif full in readers:
            if hidden is None:
                not_folded[full] = f"{rel}: residual reader, no global permutation"
            elif not torch.equal(p, hidden):
                not_folded[full] = f"{rel}: residual reader, permutation differs from the global hidden permutation"
            else:
                folded.append(full)
        else:
            not_folded[full] = f"{rel}: no known producer of its input"

    if hidden is not None:
        global_hidden_permutation(model, hidden)
    for full, module, p, edits in folds:
        permute_columns(module, p)
        for producer, start, row_perm in edits:
            _permute_rows(producer, row_perm, start)
        folded.append(full)
    order = {name: i for i, name in enumerate(perms)}
    folded.sort(key=order.__getitem__)
    return FoldResult(folded, not_folded, hidden is not None)


@torch.no_grad()
def fold_for_export(model: nn.Module, report: PruneReport, fallback: str = "masked",
                    verified: str = "") -> tuple[dict[str, Layout], FoldRecord]:
    """Fold every exact permutation of a masked pruned model in place; return the layouts and a record.

    Linears whose permutation is the identity need nothing. The others go through
    :func:`fold_permutations` (with the report's global hidden permutation, if any); those that do not
    fold stay masked (``fallback="masked"``) or get their columns permuted and a recorded runtime gather
    (``fallback="gather"``). After a global hidden permutation a reader that did not fold is N:M through
    ``argsort(hidden)[p]``, which is what is recorded.
    """
    names = [layer.name for layer in report.layers]
    perms = {name: torch.as_tensor(site.perm) for site in report.sites for name in site.linears}
    identity = {name for name, p in perms.items() if torch.equal(p, torch.arange(p.numel()))}
    identity |= {name for name in names if name not in perms}
    hidden = None if report.hidden_perm is None else torch.as_tensor(report.hidden_perm)
    to_fold = {name: perms[name] for name in names if name in perms and (hidden is not None or name not in identity)}
    result = fold_permutations(model, to_fold, hidden_perm=hidden)
    adapter = adapter_for(model)
    readers = {f"{adapter.blocks_path}.{i}.{rel}" for i in range(len(adapter.blocks(model)))
               for rel in adapter.residual_readers} if hidden is not None else set()
    inverse = torch.argsort(hidden) if hidden is not None else None
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
        if fallback == "gather":
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
