"""What the pipeline needs to know of a model's structure, as typed records, and the residual stream.

An :class:`Adapter` says where the Transformer blocks are, which linears read one and the same input
(a shared site), which permutations fold into which producers, and what makes up the residual stream.
:func:`permsparse.discover.discover` finds it from the model itself; nothing here names a family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .dense import KeptDense
from .linears import linear_weight, permute_columns, permute_rows, permute_vector
from .trace import stream_axis


@dataclass(frozen=True)
class AttentionGeometry:
    """Heads of one attention layer; query heads ``h`` read kv head ``h // (num_heads // num_kv_heads)``."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Hints:
    """What discovery cannot read from a model of one family, given by hand (``permsparse.discover.adapters``).

    ``kv_heads`` gives the number of key/value heads from the config, for families whose config does not
    say it as ``num_key_value_heads``.
    """

    kv_heads: Callable[[object], int] | None = None


def attention_geometry(config, hints: Hints = Hints()) -> AttentionGeometry | None:
    """The attention geometry a (text) config states, or None when it names no heads or they differ per
    layer (transformers' per-layer config attributes refuse a single value)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        heads = getattr(config, "num_attention_heads", None)
        if not heads:
            return None
        kv = hints.kv_heads(config) if hints.kv_heads is not None else getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    except RuntimeError:  # AmbiguousGlobalPerLayerAttributeError: a geometry per layer
        return None
    return AttentionGeometry(heads, kv, head_dim)


@dataclass(frozen=True)
class OutputSlice:
    """Output rows of a linear that feed another linear, in the order the consumer reads them.

    Rows ``start .. start+size`` (``size=0``: every row); with a ``period``, those rows of every run of
    ``period`` rows, one run after the other (a fused projection that interleaves heads). Between the
    producer and its consumer only channel-wise operations happen (activation, gating product,
    attention's weighted sum over positions), so permuting these rows permutes the consumer's input.
    """

    linear: str
    start: int = 0
    size: int = 0
    period: int = 0

    def rows(self, total: int) -> torch.Tensor:
        """Indices of the rows, for a producer of ``total`` output rows."""
        size = self.size or total - self.start
        if not self.period:
            return torch.arange(self.start, self.start + size)
        runs = torch.arange(total // self.period)[:, None] * self.period
        return (runs + self.start + torch.arange(size)).flatten()

    def describe(self) -> str:
        if not self.size:
            return self.linear
        every = f" of every {self.period}" if self.period else ""
        return f"{self.linear}[{self.start}:{self.start + self.size}{every}]"


@dataclass(frozen=True)
class BlockKind:
    """The structure shared by the blocks of one kind (one layout of linears and the same traced facts).

    Names are relative to a block. ``input_groups`` lists the linears that read one and the same input
    tensor, in forward order. ``attn_output`` names the projection that reads the attention heads' outputs,
    so its permutation can be kept within heads and kv groups; ``heads`` gives those heads where they are
    not the model's attention geometry (multi-head latent attention: value heads of their own width).
    ``producers`` maps a consumer linear to the output slices that make its input (its permutation folds
    into their rows, exactly); ``fold_norms`` maps a consumer to the norms between its producers and it,
    whose parameters that fold permutes alike (a low-rank projection normed before its up-projection);
    ``not_foldable`` says why the other consumers do not fold.

    The residual stream: ``residual_readers`` read it (through a norm), ``residual_writers`` add their rows
    to it, ``block_norms`` act on it. ``routers`` route tokens to mixture-of-experts linears: they stay
    dense, and their columns read the residual stream. ``kept_dense`` lists the parameters of no linear that
    stay dense, with the reason (a state-space mixer's convolution and decay, a router's bias correction).
    """

    input_groups: tuple[tuple[str, ...], ...]
    attn_output: str = ""
    producers: tuple[tuple[str, tuple[OutputSlice, ...]], ...] = ()
    not_foldable: tuple[tuple[str, str], ...] = ()
    residual_readers: tuple[str, ...] = ()
    residual_writers: tuple[str, ...] = ()
    block_norms: tuple[str, ...] = ()
    routers: tuple[str, ...] = ()
    fold_norms: tuple[tuple[str, tuple[str, ...]], ...] = ()
    heads: AttentionGeometry | None = None
    kept_dense: tuple[KeptDense, ...] = ()

    def producers_of(self, consumer: str) -> tuple[OutputSlice, ...]:
        return dict(self.producers).get(consumer, ())

    def norms_of(self, consumer: str) -> tuple[str, ...]:
        """The norms a fold of ``consumer``'s permutation permutes besides its producers' rows."""
        return dict(self.fold_norms).get(consumer, ())

    def attention(self, geometry: AttentionGeometry | None) -> AttentionGeometry | None:
        """The heads of ``attn_output``'s input: this kind's own, else the model's ``geometry``."""
        return self.heads or geometry


@dataclass(frozen=True)
class Adapter:
    """How to walk one model: blocks, their kinds, and the residual stream.

    ``kinds`` holds the structure of each kind of block (:class:`BlockKind`) and ``block_kinds`` the index
    of the kind of every block (empty: every block is of the one kind), so a stack of dense and
    mixture-of-experts blocks, or of attention and linear-attention blocks, is one model. ``geometry``:
    the attention heads, as the config (and the family's hints) state them.

    Model-level names of the residual stream: ``token_embedding`` (only when no ``input_projection`` maps a
    narrower embedding into the stream), ``position_embeddings``, ``embedding_norms`` (before the first
    block), ``final_norms`` (after the last) and ``output_readers`` (the linears reading the final hidden
    state: the LM head, an output projection, a pooler). ``stream_parameters`` (full names) start the
    stream without being an embedding's or a linear's: a patch embedding's convolution (its output
    channels) and a class token or position embeddings (their last axis). ``stream_problem`` says why one
    permutation of the whole stream would change the model's output ("" when it was verified not to).

    A model of one kind of block reads that kind's fields from the adapter itself (``input_groups``,
    ``producers``...); with several kinds these ask for :meth:`kind`.
    """

    name: str
    blocks_path: str
    kinds: tuple[BlockKind, ...]
    block_kinds: tuple[int, ...] = ()
    token_embedding: str = ""
    position_embeddings: tuple[str, ...] = ()
    embedding_norms: tuple[str, ...] = ()
    input_projection: str = ""
    final_norms: tuple[str, ...] = ()
    output_readers: tuple[str, ...] = ()
    stream_parameters: tuple[str, ...] = ()
    geometry: AttentionGeometry | None = None
    stream_problem: str = ""

    def kind(self, i: int) -> BlockKind:
        """The kind of block ``i``."""
        return self.kinds[self.block_kinds[i] if self.block_kinds else 0]

    def blocks_of(self, kind: int, count: int) -> list[int]:
        """The indices of the blocks of kind ``kind`` among ``count`` blocks."""
        return [i for i in range(count) if (self.block_kinds[i] if self.block_kinds else 0) == kind]

    @property
    def single(self) -> BlockKind:
        """The one kind of every block; an error for a model of several kinds (ask :meth:`kind`)."""
        if len(self.kinds) != 1:
            raise ValueError(f"{self.name} has {len(self.kinds)} kinds of blocks: ask adapter.kind(i) for block i's")
        return self.kinds[0]

    input_groups = property(lambda self: self.single.input_groups)
    attn_output = property(lambda self: self.single.attn_output)
    producers = property(lambda self: self.single.producers)
    not_foldable = property(lambda self: self.single.not_foldable)
    residual_readers = property(lambda self: self.single.residual_readers)
    residual_writers = property(lambda self: self.single.residual_writers)
    block_norms = property(lambda self: self.single.block_norms)
    routers = property(lambda self: self.single.routers)
    kept_dense = property(lambda self: self.single.kept_dense)

    def producers_of(self, consumer: str) -> tuple[OutputSlice, ...]:
        return self.single.producers_of(consumer)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def attention(self, config) -> AttentionGeometry | None:
        """The attention geometry: the discovered one, or the one ``config`` states."""
        return self.geometry or attention_geometry(config)


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


def optional_submodule(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule ``name``, or None when the name is empty or the module is absent (or set to None)."""
    if not name:
        return None
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def stream_parts(model: nn.Module, adapter: Adapter) -> dict[str, list[tuple[str, nn.Module]]]:
    """Every part of the residual stream, by role, as ``(full name, module)`` pairs present in ``model``."""
    parts: dict[str, list[tuple[str, nn.Module]]] = {"embeddings": [], "norms": [], "readers": [], "writers": []}

    def add(role: str, name: str) -> None:
        module = optional_submodule(model, name)
        if module is not None:
            parts[role].append((name, module))

    if adapter.input_projection:
        add("writers", adapter.input_projection)
    else:
        add("embeddings", adapter.token_embedding)
    for name in adapter.position_embeddings:
        add("embeddings", name)
    for name in adapter.embedding_norms:
        add("norms", name)
    for i in range(len(adapter.blocks(model))):
        prefix, kind = f"{adapter.blocks_path}.{i}.", adapter.kind(i)
        for name in kind.block_norms:
            add("norms", prefix + name)
        for name in kind.residual_readers + kind.routers:
            add("readers", prefix + name)
        for name in kind.residual_writers:
            add("writers", prefix + name)
    for name in adapter.final_norms:
        add("norms", name)
    for name in adapter.output_readers:
        add("readers", name)
    return parts


def blocks_config(model: nn.Module, blocks_path: str):
    """The config of the model that owns the blocks at ``blocks_path``: the nearest enclosing module with a
    config (a vision-language model's language model), else ``model``'s own."""
    parts = blocks_path.split(".")
    for end in range(len(parts) - 1, 0, -1):
        config = getattr(model.get_submodule(".".join(parts[:end])), "config", None)
        if config is not None:
            return config
    return model.config


def hidden_size(model: nn.Module, adapter: Adapter) -> int:
    """Width of the residual stream: the rows of the input projection that starts it, else the width of the
    token embedding, else the rows of a block's first writer."""
    if adapter.input_projection:
        return linear_weight(model.get_submodule(adapter.input_projection)).shape[0]
    embedding = optional_submodule(model, adapter.token_embedding)
    if embedding is not None:
        return embedding.weight.shape[1]
    block = adapter.blocks(model)[0]
    return linear_weight(block.get_submodule(adapter.kind(0).residual_writers[0])).shape[0]


@torch.no_grad()
def permute_stream(model: nn.Module, adapter: Adapter, perm: torch.Tensor) -> list[str]:
    """Permute the hidden dimension of the whole residual stream in place; returns the modules touched.

    New hidden channel j holds old channel ``perm[j]``: embedding columns, the stream parameters (a patch
    embedding's output channels, a class token), every norm's parameters, the rows (and biases) of every
    writer and the columns of every reader. A tensor shared by several modules
    (tied embeddings and LM head) is permuted once.
    """
    done, touched = set(), []

    def once(tensor: torch.Tensor) -> bool:
        key = tensor.data_ptr()
        if key in done:
            return False
        done.add(key)
        return True

    parts = stream_parts(model, adapter)
    for name, module in parts["embeddings"]:
        if once(module.weight):
            module.weight.copy_(module.weight[:, perm.to(module.weight.device)])
        touched.append(name)
    for name in adapter.stream_parameters:
        param = model.get_parameter(name)
        if once(param):
            axis = stream_axis(model.get_submodule(name.rpartition(".")[0]))
            param.copy_(param.index_select(axis, perm.to(param.device)))
        touched.append(name)
    for name, module in parts["norms"]:
        for param in module.parameters(recurse=False):
            permute_vector(param, perm)
        touched.append(name)
    for name, module in parts["writers"]:
        permute_rows(module, perm)
        touched.append(name)
    for name, module in parts["readers"]:
        if once(linear_weight(module)):
            permute_columns(module, perm)
        touched.append(name)
    return touched
