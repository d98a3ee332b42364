"""Discovering a Transformer's structure from the model itself, so any family works without a table.

:func:`discover` finds, for a Hugging Face model:

- the blocks: the outermost ModuleList of modules holding linears (the largest one); every block must
  hold the same linears. The routers of mixture-of-experts layers whose packed experts are split into
  linears (:mod:`.experts`: discover such a model inside :func:`experts_as_linears`; every expert then runs
  on every probe token) stay dense, and so does every other weight of no linear – a state-space mixer's
  convolution, decay and step parameters, a router's bias correction – listed with the reason
  (:mod:`.dense`); packed weights left unsplit are refused by name;
- from one traced forward pass (:mod:`.trace`) on seeded token ids, or seeded random images of the
  config's size for a model that reads pixel values: which linears read the same tensor (a shared site), which
  linears of a block feed each linear's input, which write into the residual stream and which read it,
  the norms acting on it, and the embeddings (a patch embedding, a class token), norms and readers of the
  stream outside the blocks. Where
  the config has a tensor-parallel plan, its ``colwise*`` entries are the readers and its ``rowwise*``
  entries the writers;
- the folds (:mod:`.verify`): for each linear fed by other linears, the producer rows its permutation
  folds into, guessed among the layouts in use (the whole rows, chunks of fused projections, the value
  part of fused q/k/v within heads) and kept only when a forward pass shows the fold exact; and whether
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
from .linears import is_linear, linear_weight, permute_columns, permute_rows, stored_layout
from .structure import (Adapter, AttentionGeometry, Hints, OutputSlice, attention_geometry, blocks_config, head_permutation,
                        hidden_size, optional_submodule, permute_stream, stream_parts)
from .towers import TOWERS, Towers, TowerError, find_towers, main_input, reads_pixels, vision_tower
from .trace import (NotUnderstood, block_facts, check_blocks, find_blocks, model_facts, model_inputs, primary_output,
                    probe_input, run_model, trace)
from .verify import Probe, find_fold, stream_problem

__all__ = [
    "Adapter", "AttentionGeometry", "ExpertLinears", "Hints", "KeptDense", "NotUnderstood", "OutputSlice", "attention_geometry",
    "discover", "experts_as_linears", "find_blocks", "head_permutation", "hidden_size", "is_linear", "is_packed_experts",
    "linear_weight", "model_inputs",
    "optional_submodule", "permute_columns", "permute_rows", "TOWERS", "Towers", "TowerError", "find_towers",
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


def discover(model: nn.Module, hints: Hints = Hints()) -> Adapter:
    """The structure of ``model`` (see the module docstring); :class:`NotUnderstood` names what is not."""
    blocks_path = find_blocks(model)
    dense = routers(model)
    check_blocks(model, blocks_path, tuple(dense))
    count = len(model.get_submodule(blocks_path))
    first = f"{blocks_path}.0."
    block_routers = tuple(name.removeprefix(first) for name in dense if name.startswith(first))
    if set(dense) != {f"{blocks_path}.{i}.{rel}" for i in range(count) for rel in block_routers}:
        raise NotUnderstood(f"the blocks of {blocks_path} differ in their mixture-of-experts routers: {', '.join(dense)}")
    probe_data = probe_input(model)
    with _evaluation(model), _float32(model), every_expert_runs(model):
        traced = trace(model, blocks_path, probe_data)
        facts = [block_facts(traced, blocks_path, i) for i in range(count)]
        outside = model_facts(model, traced, blocks_path)
        del traced  # the recorded graph is no longer needed
        block = facts[0]
        for i, other in enumerate(facts):
            for part in (f for f in block.__dataclass_fields__ if getattr(other, f) != getattr(block, f)):
                raise NotUnderstood(f"{blocks_path}.{i} differs from {blocks_path}.0 in its {part.replace('_', ' ')}: "
                                    f"{getattr(other, part)} vs {getattr(block, part)}")
        readers, writers = plan_roles(model, blocks_path, block.linears) or (block.stream_readers, block.writers)
        readers, writers = (tuple(n for n in names if n not in block_routers) for names in (readers, writers))
        groups = tuple(g for g in (tuple(n for n in group if n not in block_routers) for group in block.groups) if g)
        adapter = Adapter(
            name=getattr(model.config, "model_type", type(model).__name__), blocks_path=blocks_path,
            input_groups=groups, residual_readers=readers, residual_writers=writers, block_norms=block.norms,
            token_embedding=outside.token_embedding, position_embeddings=outside.position_embeddings,
            embedding_norms=outside.embedding_norms, input_projection=outside.input_projection,
            final_norms=outside.final_norms, output_readers=outside.output_readers,
            stream_parameters=outside.stream_parameters, geometry=attention_geometry(model.config, hints),
            routers=block_routers, kept_dense=kept_dense(model.get_submodule(blocks_path)[0], block_routers)
            + uncalled_linears(model.get_submodule(blocks_path)[0], block.linears + block_routers))
        consumers = [(rel, feeds) for rel, feeds in block.feeds if rel not in readers and rel not in block_routers]
        names = [f"{blocks_path}.{i}.{rel}" for i in range(count) for rel, _ in consumers]
        probe = Probe(model, probe_data, names)
        producers, not_foldable, attn_output = [], [], ""
        for rel, feeds in consumers:
            slices, attention = find_fold(probe, adapter, rel, feeds)
            if not slices:
                source = f"rows of {', '.join(feeds)}" if feeds else "no linear of the block"
                not_foldable.append((rel, f"no exact fold found: its input comes from {source}"))
            elif attention and attn_output:
                not_foldable.append((rel, f"a second attention output besides {attn_output}"))
            else:
                producers.append((rel, slices))
                attn_output = rel if attention else attn_output
        adapter = replace(adapter, producers=tuple(producers), not_foldable=tuple(not_foldable),
                          attn_output=attn_output)
        problem = stream_problem(probe, adapter, outside.output_is_stream, outside.unplaced, outside.side_readers)
    towers = find_towers(model)
    if towers is not None and not problem:  # the text-only probe does not show the image path into the stream
        problem = (f"image features from {towers.vision} enter the residual stream of {towers.language} outside its "
                   "blocks, through a projector discovery does not permute")
    return replace(adapter, stream_problem=problem)
