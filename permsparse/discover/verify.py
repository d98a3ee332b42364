"""Numerical checks of what discovery guessed: a fold or a stream permutation is used only once it is seen
to leave the model's output unchanged on a forward pass.

Each check permutes weights in place (producer rows and consumer columns of every block, or the whole
residual stream) with seeded random permutations, runs the probe input, compares, and permutes back;
permutations only move values, so the model is restored bit for bit. A wrong guess fails its check and
degrades to "not foldable", never to a wrong model.
"""
from __future__ import annotations

import torch
from torch import nn

from .linears import linear_weight, permute_columns, permute_rows
from .structure import (Adapter, AttentionGeometry, OutputSlice, head_permutation, hidden_size, permute_stream,
                        stream_parts)
from .trace import primary_output, run_model

# Largest difference allowed, relative to the largest reference value: reordered sums only.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}
SEED = 1


class Probe:
    """The model on the probe input: the inputs of named linears and the model's output, with a reference
    recorded before any check."""

    def __init__(self, model: nn.Module, data: torch.Tensor, names: list[str]):
        self.model, self.data = model, data
        self.tolerance = TOLERANCE.get(next(model.parameters()).dtype, 1e-4)
        self.inputs, self.output = self.run(names)

    @torch.no_grad()
    def run(self, names: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        seen: dict[str, torch.Tensor] = {}

        def hook(name):
            def record(_module, args):
                seen.setdefault(name, args[0].detach().clone())
            return record

        handles = [self.model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
        try:
            output = primary_output(run_model(self.model, self.data)).detach()
        finally:
            for handle in handles:
                handle.remove()
        return seen, output

    def close(self, value: torch.Tensor, reference: torch.Tensor) -> bool:
        scale = reference.abs().max().clamp_min(1e-30)
        return bool(value.shape == reference.shape and ((value - reference).abs().max() / scale) <= self.tolerance)


def _random_perm(n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def random_head_perm(geometry: AttentionGeometry, gen: torch.Generator) -> torch.Tensor:
    """A random permutation within heads, the same for the query heads of one kv head."""
    per_kv, hd = geometry.num_heads // geometry.num_kv_heads, geometry.head_dim
    perm = torch.empty(geometry.num_heads * hd, dtype=torch.long)
    for kv in range(geometry.num_kv_heads):
        local = torch.randperm(hd, generator=gen)
        for h in range(kv * per_kv, (kv + 1) * per_kv):
            perm[h * hd:(h + 1) * hd] = h * hd + local
    return perm


@torch.no_grad()
def _permute_norm(norm: nn.Module, perm: torch.Tensor) -> None:
    """Permute every parameter of a channel module (a norm's weight and bias) by ``perm``."""
    for param in norm.parameters(recurse=False):
        param.copy_(param[perm.to(param.device)])


def fold_holds(probe: Probe, adapter: Adapter, members: list[int], consumers: tuple[str, ...],
               slices: tuple[OutputSlice, ...], heads: AttentionGeometry | None, norms: tuple[str, ...] = ()) -> bool:
    """Whether permuting ``slices``' rows (and the parameters of the ``norms`` between them and the
    consumers) in every block of ``members`` permutes the input of the ``consumers`` (linears reading one
    tensor) alike and, with their columns permuted too, leaves the model's output unchanged (``heads``: an
    attention output, permuted within these heads, via the value rows)."""
    model = probe.model
    undo, expected = [], {}  # undo: (module, permutation applied, rows, or None for columns, or "norm")
    try:
        for i in members:
            prefix = f"{adapter.blocks_path}.{i}."
            modules = [model.get_submodule(prefix + consumer) for consumer in consumers]
            width = linear_weight(modules[0]).shape[1]
            gen = torch.Generator().manual_seed(SEED + i)
            p = random_head_perm(heads, gen) if heads else _random_perm(width, SEED + i)
            rows_perm = head_permutation(p, heads)[0] if heads else p
            for part in slices:
                producer = model.get_submodule(prefix + part.linear)
                total = linear_weight(producer).shape[0]
                rows = part.rows(total)
                if rows.numel() != rows_perm.numel() or int(rows.max()) >= total:
                    return False
                permute_rows(producer, rows_perm, rows)
                undo.append((producer, rows_perm, rows))
            for name in norms:
                norm = model.get_submodule(prefix + name)
                if any(param.shape != (rows_perm.numel(),) for param in norm.parameters(recurse=False)):
                    return False
                _permute_norm(norm, rows_perm)
                undo.append((norm, rows_perm, "norm"))
            for consumer, module in zip(consumers, modules):
                permute_columns(module, p)
                undo.append((module, p, None))
                expected[prefix + consumer] = probe.inputs[prefix + consumer][..., p.to(probe.data.device)]
        inputs, output = probe.run(list(expected))
        return probe.close(output, probe.output) and all(probe.close(inputs[n], x) for n, x in expected.items())
    finally:
        for module, perm, rows in reversed(undo):
            if rows is None:
                permute_columns(module, torch.argsort(perm))
            elif isinstance(rows, str):
                _permute_norm(module, torch.argsort(perm))
            else:
                permute_rows(module, torch.argsort(perm), rows)


def value_slices(producer: str, rows: int, geometry: AttentionGeometry) -> list[OutputSlice]:
    """Where a producer of ``rows`` output rows may hold the attention values, in the layouts in use: the
    whole of it (a value projection), the last part of ``[q | k | v]``, the value head of every
    ``[q heads of one kv head | k | v]`` run (fused projections interleaved per kv head), the second half
    of ``[k | v]``, the value head at the end of every kv head's ``[key part | value]`` run (multi-head
    latent attention's up-projection of its compressed keys and values)."""
    hd, per_kv = geometry.head_dim, geometry.num_heads // geometry.num_kv_heads
    values, queries = geometry.num_kv_heads * hd, geometry.num_heads * hd
    out = []
    if rows == values:
        out.append(OutputSlice(producer))
    if rows == queries + 2 * values:
        out.append(OutputSlice(producer, queries + values, values))
        out.append(OutputSlice(producer, (per_kv + 1) * hd, hd, (per_kv + 2) * hd))
    if rows == 2 * values:
        out.append(OutputSlice(producer, values, values))
    period = rows // geometry.num_kv_heads
    if rows % geometry.num_kv_heads == 0 and hd < period:
        out.append(OutputSlice(producer, period - hd, hd, period))
    return out


def value_heads(geometry: AttentionGeometry | None, width: int) -> AttentionGeometry | None:
    """The heads an attention output of ``width`` channels may hold: the model's, or, where their width
    differs from the model's head dim (multi-head latent attention's value heads), as many heads of
    ``width / num_heads`` channels; None when neither fits."""
    if geometry is None or geometry.num_heads % geometry.num_kv_heads:
        return None
    if geometry.num_heads * geometry.head_dim == width:
        return geometry
    if width % geometry.num_heads:
        return None
    return AttentionGeometry(geometry.num_heads, geometry.num_kv_heads, width // geometry.num_heads)


def channel_guesses(feeds: dict[str, int], width: int) -> list[tuple[OutputSlice, ...]]:
    """Producer rows a consumer of ``width`` input channels may read through channel-wise operations, in
    order: every row of every feeding linear (of ``feeds``: name -> rows), in chunks of ``width`` (MLPs,
    fused gate/up); then the first or the last ``width`` rows of one feeding linear (a projection whose
    output is split, one part read by the consumer)."""
    guesses = []
    if feeds and all(r % width == 0 for r in feeds.values()):
        guesses.append(tuple(OutputSlice(name) if r == width else OutputSlice(name, j * width, width)
                             for name, r in feeds.items() for j in range(r // width)))
    for name, r in feeds.items():
        if r > width and r % width:
            guesses += [(OutputSlice(name, 0, width),), (OutputSlice(name, r - width, width),)]
    return guesses


def find_fold(probe: Probe, adapter: Adapter, members: list[int], consumers: tuple[str, ...], feeds: tuple[str, ...],
              norms: tuple[str, ...] = ()) -> tuple[tuple[OutputSlice, ...], tuple[str, ...], AttentionGeometry | None]:
    """The producer slices the one permutation of ``consumers`` (linears reading one tensor) folds into in
    the blocks ``members`` (one kind), the norms it permutes alike, and the heads it is kept within when it
    is the attention output; ``((), (), None)`` when no guess holds. Guesses, in order: the channel-wise ones
    (:func:`channel_guesses`), first without and then with the ``norms`` found between the producers and
    the consumers; then, for a single consumer, each feeding linear's value rows alone, within heads
    (attention)."""
    block = adapter.blocks(probe.model)[members[0]]
    width = linear_weight(block.get_submodule(consumers[0])).shape[1]
    rows = {name: linear_weight(block.get_submodule(name)).shape[0] for name in feeds}
    for slices in channel_guesses(rows, width):
        for between in ((), norms) if norms else ((),):
            if fold_holds(probe, adapter, members, consumers, slices, None, between):
                return slices, between, None
    heads = value_heads(adapter.geometry, width)
    if heads is None or len(consumers) > 1:
        return (), (), None
    for name in feeds:
        for part in value_slices(name, rows[name], heads):
            if fold_holds(probe, adapter, members, consumers, (part,), heads):
                return (part,), (), heads
    return (), (), None


def off_width(model: nn.Module, adapter: Adapter, width: int) -> list[str]:
    """Parts found on the residual stream whose channels are not ``width`` (an embedding of another width,
    a norm of a narrower tensor, a router taken for a writer): named with their width."""
    parts = stream_parts(model, adapter)
    widths = [(name, module.weight.shape[1]) for name, module in parts["embeddings"]]
    widths += [(name, p.numel()) for name, module in parts["norms"] for p in module.parameters(recurse=False)]
    widths += [(name, linear_weight(module).shape[0]) for name, module in parts["writers"]]
    widths += [(name, linear_weight(module).shape[1]) for name, module in parts["readers"]]
    return [f"{name} ({size})" for name, size in widths if size != width]


def stream_problem(probe: Probe, adapter: Adapter, output_is_stream: bool, unplaced: tuple[str, ...] = (),
                   side_readers: tuple[str, ...] = ()) -> str:
    """Why one permutation of the whole residual stream would change the model's output; "" when a random
    one, applied to every part found, leaves it unchanged. ``side_readers``: linears outside the blocks that
    read the embeddings besides the stream (Gemma 4's per-layer projection), named when the check fails."""
    if unplaced:
        return f"the stream starts in {', '.join(unplaced)}, whose channels discovery cannot place"
    if output_is_stream:
        return "the model's output is the final hidden state itself (no head to absorb the permutation)"
    if not any(kind.residual_writers for kind in adapter.kinds) or not any(kind.residual_readers
                                                                            for kind in adapter.kinds):
        return "no reader or writer of the residual stream found"
    width = hidden_size(probe.model, adapter)
    narrow = off_width(probe.model, adapter, width)
    if narrow:
        return f"parts found on the stream are not {width} wide: {', '.join(narrow[:3])}{' ...' if len(narrow) > 3 else ''}"
    perm = _random_perm(width, SEED)
    permute_stream(probe.model, adapter, perm)
    try:
        output = probe.run([])[1]
    finally:
        permute_stream(probe.model, adapter, torch.argsort(perm))
    if probe.close(output, probe.output):
        return ""
    if side_readers:
        return (f"the embeddings are also read outside the blocks by {', '.join(side_readers)}, which a stream "
                "permutation does not reach")
    return "permuting the parts found of the residual stream changes the output"
