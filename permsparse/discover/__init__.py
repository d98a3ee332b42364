"""Discovering a Transformer's structure from the model itself, so any family works without a table.

:func:`discover` finds, for a Hugging Face model:

- the blocks: the outermost ModuleList of modules holding linears (the largest one). The routers of
  mixture-of-experts layers whose packed experts are split into linears (:mod:`.experts`: discover such a
  model inside :func:`experts_as_linears`; every expert then runs on every probe token) stay dense, and so
  does every other weight of no linear – a state-space mixer's convolution, decay and step parameters, a
  router's bias correction – listed with the reason (:mod:`.dense`); packed weights left unsplit are
  refused by name;
- the kinds of block (:class:`BlockKind`): blocks holding the same linears (names and shapes), showing
  the same facts in the traced pass and having the same routers are of one kind – a stack of dense and
  mixture-of-experts blocks, or of attention and linear-attention blocks, has several – and everything
  below is found, and verified, per kind;
- from one traced forward pass (:mod:`.trace`) on seeded token ids, or seeded random images of the
  config's size for a model that reads pixel values: which linears read the same tensor (a shared site), which
  linears of a block feed each linear's input, which write into the residual stream and which read it,
  the norms acting on it, and the embeddings (a patch embedding, a class token), norms and readers of the
  stream outside the blocks. Where
  the config has a tensor-parallel plan, its ``colwise*`` entries are the readers and its ``rowwise*``
  entries the writers;
- the folds (:mod:`.verify`): for each linear fed by other linears, the producer rows its permutation
  folds into, guessed among the layouts in use (the whole rows, chunks of fused projections, a part of a
  split projection, with the norms on the way permuted alike – multi-head latent attention's normed
  low-rank projections –, the value part of fused q/k/v or of a per-head ``[key | value]`` up-projection
  within heads) and kept only when a forward pass shows the fold exact on every block of the kind; and whether
  one permutation of the whole residual stream leaves the output unchanged. A model in 16-bit floats is
  checked in float32 (cast up for the checks and back after, exactly), since at 16-bit rounding a wrong
  guess on a small random model can pass for exact.

The attention geometry (heads, kv heads, head dim) is read from the config; :class:`Hints` carry what a
family's config does not say. The same model always gives the same result.
"""
from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from .dense import KeptDense, kept_dense, uncalled_linears
from .experts import ExpertLinears, every_expert_runs, experts_as_linears, is_packed_experts, routers
from .linears import is_linear, linear_weight, permute_columns, permute_rows, permute_vector, stored_layout
from .structure import (Adapter, AttentionGeometry, BlockKind, Hints, OutputSlice, attention_geometry, blocks_config, head_permutation,
                        hidden_size, optional_submodule, permute_stream, stream_parts)
from .towers import TOWERS, Towers, TowerError, find_towers, main_input, reads_pixels, vision_tower
from .trace import (INPUT, BlockFacts, NotUnderstood, Traced, block_facts, block_layout, check_blocks, find_blocks,
                    model_facts, model_inputs, primary_output, probe_input, reach, run_model, trace)
from .verify import Probe, find_fold, stream_problem

__all__ = [
    "Adapter", "AttentionGeometry", "BlockKind", "ExpertLinears", "Hints", "KeptDense", "NotUnderstood", "OutputSlice",
    "attention_geometry",
    "discover", "experts_as_linears", "find_blocks", "head_permutation", "hidden_size", "is_linear", "is_packed_experts",
    "linear_weight", "model_inputs",
    "optional_submodule", "permute_columns", "permute_rows", "permute_vector", "TOWERS", "Towers", "TowerError", "find_towers",
    "main_input", "reads_pixels", "vision_tower", "blocks_config",
    "permute_stream", "primary_output", "probe_input", "run_model", "stored_layout", "stream_parts",
]


@contextmanager
def _float32(model: nn.Module):
    """Every 16-bit floating parameter and buffer of ``model`` as a float32 copy while inside; the original
    tensors come back after (so views of packed expert weights stay views; the checks restore every value
    they move, and their copies are dropped)."""
    half = [t for t in (*model.parameters(), *model.buffers()) if t.dtype in (torch.float16, torch.bfloat16)]
    originals = [t.data for t in half]
    with torch.no_grad():
        for t in half:
            t.data = t.data.float()
    try:
        yield
    finally:
        for t, original in zip(half, originals):
            t.data = original


@contextmanager
def _evaluation(model: nn.Module):
    """Eval mode (no dropout) while discovering; every module's mode restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def plan_roles(model: nn.Module, blocks_path: str,
               linears: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """Residual readers and writers (block-relative) from the config's tensor-parallel plan: ``colwise*``
    entries read the stream, ``rowwise*`` entries write it. None when there is no plan, it leaves a linear of
    the block out or gathers a linear's output (``colwise_gather_output``: a state-space mixer's output
    projection writes the stream under it)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    plan = getattr(config, "base_model_tp_plan", None)
    if not plan:
        return None
    base = "" if model.base_model is model else model.base_model_prefix + "."
    path = blocks_path[len(base):] if blocks_path.startswith(base) else blocks_path
    readers, writers = [], []
    for rel in linears:
        styles = [style for key, style in plan.items() if fnmatch.fnmatchcase(f"{path}.0.{rel}", key)]
        if any(s.endswith("gather_output") for s in styles):  # its output replicated: reader or writer alike
            return None
        if any(s.startswith("colwise") for s in styles):
            readers.append(rel)
        elif any(s.startswith("rowwise") for s in styles):
            writers.append(rel)
        else:
            return None
    return tuple(readers), tuple(writers)


def _norms_between(traced: Traced, blocks_path: str, i: int, rel: str) -> tuple[str, ...]:
    """The channel modules (norms) of block ``i`` on the way from the linears feeding ``rel`` to its input
    (block-relative, in forward order)."""
    prefix = f"{blocks_path}.{i}."
    stops = {out: name for name, (_, _, out) in traced.linears.items() if name.startswith(prefix) and out is not None}
    stops[traced.block_inputs[i]] = INPUT
    marks = {out: name[len(prefix):] for name, (_, out) in traced.channels.items()
             if name.startswith(prefix) and out is not None}
    marked = reach(traced.linears[prefix + rel][1], stops, marks)[1]
    return tuple(name for name in marks.values() if name in marked)


def _block_kinds(blocks: nn.ModuleList, facts: list[BlockFacts],
                 block_routers: list[tuple[str, ...]]) -> tuple[list[int], list[int]]:
    """The kind of every block – blocks of one kind hold the same linears (names and shapes), show the same
    traced facts and have the same routers – and the first block of each kind."""
    keys, kinds = [], []
    for i, block in enumerate(blocks):
        key = (block_layout(block), facts[i], block_routers[i])
        if key not in keys:
            keys.append(key)
        kinds.append(keys.index(key))
    return kinds, [kinds.index(k) for k in range(len(keys))]


def _kind_roles(model: nn.Module, blocks_path: str, block: nn.Module, facts: BlockFacts,
                routers_: tuple[str, ...]) -> BlockKind:
    """A kind's input groups and stream roles, from its facts (and the tensor-parallel plan), without
    routers; and the parameters of its first ``block`` that stay dense."""
    readers, writers = plan_roles(model, blocks_path, facts.linears) or (facts.stream_readers, facts.writers)
    readers, writers = (tuple(n for n in names if n not in routers_) for names in (readers, writers))
    groups = tuple(g for g in (tuple(n for n in group if n not in routers_) for group in facts.groups) if g)
    return BlockKind(input_groups=groups, residual_readers=readers, residual_writers=writers, block_norms=facts.norms,
                     routers=routers_,
                     kept_dense=kept_dense(block, routers_) + uncalled_linears(block, facts.linears + routers_))


def _kind_folds(probe: Probe, adapter: Adapter, kind: BlockKind, members: list[int], facts: BlockFacts,
                between: dict[str, tuple[str, ...]]) -> BlockKind:
    """``kind`` with the folds of its consumers, each verified on every block of ``members``. Consumers
    reading one tensor (an input group) are verified together: their producers' rows are permuted once,
    for all of them."""
    feeds = dict(facts.feeds)
    consumers = [tuple(n for n in group if n in feeds and n not in kind.residual_readers and n not in kind.routers)
                 for group in facts.groups]
    producers, not_foldable, fold_norms, attn_output, heads = [], [], [], "", None
    for group in (g for g in consumers if g):
        source = feeds[group[0]]
        slices, norms, found = find_fold(probe, adapter, members, group, source, between.get(group[0], ()))
        for rel in group:
            if not slices:
                origin = f"rows of {', '.join(source)}" if source else "no linear of the block"
                not_foldable.append((rel, f"no exact fold found: its input comes from {origin}"))
            elif found and attn_output:
                not_foldable.append((rel, f"a second attention output besides {attn_output}"))
            else:
                producers.append((rel, slices))
                if norms:
                    fold_norms.append((rel, norms))
                if found:
                    attn_output, heads = rel, (found if found != adapter.geometry else None)
    return replace(kind, producers=tuple(producers), not_foldable=tuple(not_foldable), fold_norms=tuple(fold_norms),
                   attn_output=attn_output, heads=heads)


def discover(model: nn.Module, hints: Hints = Hints()) -> Adapter:
    """The structure of ``model`` (see the module docstring); :class:`NotUnderstood` names what is not."""
    blocks_path = find_blocks(model)
    dense = routers(model)
    check_blocks(model, blocks_path, tuple(dense))
    blocks = model.get_submodule(blocks_path)
    block_routers = [tuple(name.removeprefix(f"{blocks_path}.{i}.") for name in dense
                           if name.startswith(f"{blocks_path}.{i}.")) for i in range(len(blocks))]
    probe_data = probe_input(model)
    with _evaluation(model), _float32(model), every_expert_runs(model):
        traced = trace(model, blocks_path, probe_data)
        facts = [block_facts(traced, blocks_path, i) for i in range(len(blocks))]
        outside = model_facts(model, traced, blocks_path)
        block_kinds, firsts = _block_kinds(blocks, facts, block_routers)
        between = [{rel: _norms_between(traced, blocks_path, i, rel) for rel, _ in facts[i].feeds} for i in firsts]
        del traced  # the recorded graph is no longer needed
        adapter = Adapter(
            name=getattr(model.config, "model_type", type(model).__name__), blocks_path=blocks_path,
            kinds=tuple(_kind_roles(model, blocks_path, blocks[i], facts[i], block_routers[i]) for i in firsts),
            block_kinds=tuple(block_kinds) if len(firsts) > 1 else (),
            token_embedding=outside.token_embedding, position_embeddings=outside.position_embeddings,
            embedding_norms=outside.embedding_norms, input_projection=outside.input_projection,
            final_norms=outside.final_norms, output_readers=outside.output_readers,
            stream_parameters=outside.stream_parameters, geometry=attention_geometry(model.config, hints))
        names = [f"{blocks_path}.{i}.{rel}" for i in range(len(blocks)) for rel, _ in facts[i].feeds]
        probe = Probe(model, probe_data, names)
        kinds = tuple(_kind_folds(probe, adapter, kind, adapter.blocks_of(k, len(blocks)), facts[firsts[k]], between[k])
                      for k, kind in enumerate(adapter.kinds))
        adapter = replace(adapter, kinds=kinds)
        problem = stream_problem(probe, adapter, outside.output_is_stream, outside.unplaced, outside.side_readers)
    towers = find_towers(model)
    if towers is not None and not problem:  # the text-only probe does not show the image path into the stream
        problem = (f"image features from {towers.vision} enter the residual stream of {towers.language} outside its "
                   "blocks, through a projector discovery does not permute")
    return replace(adapter, stream_problem=problem)
