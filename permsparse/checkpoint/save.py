"""Writing a pruned model as a checkpoint: a plain Hugging Face folder plus ``permsparse.json``.

Three formats (docs/method.md, "Checkpoints"):

- ``masked``: every pruned linear stores ``W * unpermute(mask)`` in the original column order. It is
  N:M only *through* its permutation (``W[:, p]`` is N:M). ``from_pretrained(DIR)`` loads it anywhere.
- ``folded``: every permutation that folds exactly into its producers (:mod:`.fold`) is folded, so those
  linears are N:M **in storage order** (what 2:4 GPU kernels need) and the model computes the same
  function. A linear that cannot fold stays masked (``fallback="masked"``; the folder stays a plain,
  exact HF checkpoint) or is stored permuted with the permutation recorded (``fallback="gather"``;
  then only :func:`permsparse.checkpoint.load.load` gives correct outputs, as it re-attaches the
  runtime input gather).
- ``compressed``: every pruned linear stored as its kept values and packed positions, N:M in its input
  order (the permutation its mask was chosen through, stored beside it), or, quantized, as its codes and
  scales (:mod:`.compressed`); every other tensor as usual. A 2:4 linear in bf16 takes 56% of its dense
  bytes. Only :func:`permsparse.checkpoint.load.load` reads it; it expands each weight back to the
  masked export's, bit for bit.

Weights are saved in ``save_dtype`` (``auto``: compressed – the model config's 16-bit dtype, else
bfloat16; masked and folded – the dtype the model ran in); the reference logits are those of the model
in that dtype.

Everything is written into ``DIR.partial`` and renamed at the end: a folder named ``DIR`` is complete.
"""
from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path

import torch
from torch import nn

from ..config import ExportConfig, PruneConfig  # ExportConfig re-exported: light to import with the other configs
from ..evaluate.measures import Perplexity, Similarity
from ..data.images import Accuracy
from ..discover import is_linear, linear_weight
from ..quant import quantized_linears
from ..report import PruneReport
from ..evaluate.zeroshot import TaskResult
from ..run.version import package_version
from .digest import tensor_digests
from .compressed import SAVE_DTYPES, quantization_config, store_linear, stored_digest, write_stored
from .fold import fold_for_export, masked_layouts
from .load import attach_gathers, remove_gathers
from .record import FORMAT_VERSION, BlockKinds, CheckpointRecord, Layout, StorageRecord, write_record
from .reference import compare_reference, model_logits, record_reference, reference_input


# Largest weight file written at once: safetensors copies one file's tensors from the GPU to the host before
# writing, so a model on a GPU costs the host this much, never a second copy of the whole model.
SHARD = "2GB"
SHARD_BYTES = 2 * 10**9


def partial_dir(out: str | Path) -> Path:
    """Where a run writes (and keeps its resume state) until it is complete."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def check_output_free(out: str | Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless told to overwrite; call before any long work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} is a file, not a folder: --overwrite replaces only folders")
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {out} exists; pass --overwrite to replace it")


def check_export(export: ExportConfig, config: PruneConfig) -> None:
    """Reject an export that cannot be made, before any long work."""
    if export.format == "folded" and config.nm is None:
        raise ValueError(f"the folded export needs an N:M pattern; {config.pattern} is unstructured (use --export masked)")
    if export.format == "compressed" and config.nm is None and not _quantizes(config):
        raise ValueError(f"the compressed export stores N:M or quantized linears; {config.pattern} without --quant is "
                         "neither (use --export masked)")


def _quantizes(config: PruneConfig) -> bool:
    quant = getattr(config, "quant", None)
    return quant is not None and quant.kind != "none"


def save_dtype(export: ExportConfig, model: nn.Module) -> torch.dtype:
    """The dtype ``export`` saves ``model``'s weights in (see :class:`ExportConfig`)."""
    if export.save_dtype != "auto":
        return SAVE_DTYPES[export.save_dtype]
    current = next(model.parameters()).dtype
    if export.format != "compressed":
        return current
    own = getattr(model.config, "dtype", None)
    own = getattr(torch, own, None) if isinstance(own, str) else own
    return own if own in (torch.float16, torch.bfloat16) else torch.bfloat16


@torch.no_grad()
def cast_saved_tensors(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the floating parameters and persistent buffers of ``model`` to ``dtype`` in place – what a reload of
    its checkpoint in ``dtype`` holds; non-persistent buffers (rotary frequencies) keep the dtype a model
    built in ``dtype`` gives them."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and param.is_floating_point():
                param.data = param.data.to(dtype)
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point() and name not in module._non_persistent_buffers_set:
                module._buffers[name] = buffer.to(dtype)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _weights_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def _dense_storage(model: nn.Module, layouts: dict[str, Layout], dtype: torch.dtype, config: PruneConfig) -> StorageRecord:
    """The storage record of a masked or folded export: every pruned linear dense in ``dtype``."""
    from ..discover import experts_as_linears

    with experts_as_linears(model):
        shapes = [linear_weight(model.get_submodule(name)).shape for name in layouts]
    entries = sum(math.prod(shape) for shape in shapes)
    quant = getattr(config, "quant", None)
    return StorageRecord("dense", _dtype_name(dtype), quant.kind if _quantizes(config) else "none",
                         None, quant.method if _quantizes(config) else None, 0, entries * dtype.itemsize, entries * 2)


def block_kinds(model: nn.Module) -> BlockKinds | None:
    """Which kind each block of ``model`` is, as discovery finds it (packed experts split into their
    linears); None for a model discovery does not understand."""
    from ..discover import NotUnderstood, experts_as_linears
    from ..discover.adapters import adapter_for

    try:
        with experts_as_linears(model):
            adapter = adapter_for(model)
            count = len(adapter.blocks(model))
    except NotUnderstood:
        return None
    linears = [[name for group in kind.input_groups for name in group] + list(kind.routers) for kind in adapter.kinds]
    return BlockKinds(adapter.blocks_path, linears, [adapter.block_kinds[i] if adapter.block_kinds else 0
                                                      for i in range(count)])


@torch.no_grad()
def compressed_tensors(model: nn.Module, layouts: dict[str, Layout], nm: tuple[int, int] | None,
                       dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict, dict[str, str], int, int, dict[str, str]]:
    """The tensors of a compressed export of ``model`` (already in ``dtype``): every pruned linear of
    ``layouts`` (and every quantized one) in its stored form, verified to expand to the model's weight
    exactly, every other tensor as it is; with the specs, the tied keys, the pruned linears' stored and
    dense bf16 bytes and the digests of their expanded weights."""
    from transformers.pytorch_utils import Conv1D

    quantized = quantized_linears(model)
    names = list(layouts) + [name for name in quantized if name not in layouts]
    tensors: dict[str, torch.Tensor] = {}
    specs, digests = {}, {}
    stored_bytes = dense_bytes = 0
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if module is None or not is_linear(module):
            raise ValueError(f"{name} is not a linear module of the model: the compressed export stores linears "
                             "only (packed expert weights are not supported; use --export masked)")
        weight = linear_weight(module).detach()
        layout = layouts.get(name)
        order = torch.as_tensor(layout.perm) if layout is not None and layout.perm is not None else None
        try:
            stored = store_linear(weight, nm=nm, order=order, quantized=quantized.get(name), dtype=dtype,
                                  transposed=isinstance(module, Conv1D))
        except ValueError as err:
            raise ValueError(f"{name}: cannot be stored compressed: {err}") from None
        expanded = stored.expand(dtype)
        if not torch.equal(expanded, weight.cpu()):
            raise RuntimeError(f"{name}: the stored form does not expand to the model's weight (a quantized record "
                               "that does not match the weight?)")
        tensors.update(stored.tensors(name))
        specs[name] = stored.spec
        digests[name] = stored_digest(expanded)
        stored_bytes += stored.nbytes
        dense_bytes += weight.numel() * 2
    skip = {f"{name}.weight" for name in names}
    seen: dict[int, str] = {}
    tied: dict[str, str] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            if key in skip or seen[id(tensor)] in skip:
                raise ValueError(f"{key} is tied to {seen[id(tensor)]}: a pruned linear's weight cannot be shared")
            tied[key] = seen[id(tensor)]
            continue
        seen[id(tensor)] = key
        if key not in skip:
            tensors[key] = tensor.detach().cpu().contiguous()
    return tensors, specs, tied, stored_bytes, dense_bytes, digests


def export_checkpoint(model: nn.Module, tokenizer, out: str | Path, config: PruneConfig, report: PruneReport, *,
                      export: ExportConfig = ExportConfig(), model_name: str = "",
                      metrics: dict[str, Perplexity | Similarity | Accuracy] | None = None,
                      zero_shot: list[TaskResult] | None = None, command: str = "", overwrite: bool = False,
                      in_place: bool = False) -> Path:
    """Write the pruned (masked, in-memory) ``model`` to ``out`` as ``export`` says.

    The reference logits are recorded from ``model`` in the save dtype, before folding; the folded model
    (gathers attached) must reproduce them, and every compressed linear must expand to the model's weight
    exactly, or nothing is written. The folded export, and an export in another dtype, work on a deep
    copy unless ``in_place``, which saves memory but leaves ``model`` cast and folded (and, with
    ``fallback="gather"``, wrong without its gathers).
    """
    out = Path(out)
    check_export(export, config)
    check_output_free(out, overwrite)
    dtype = save_dtype(export, model)
    blocks = block_kinds(model)  # before any cast: the structure found while pruning
    cast = dtype != next(model.parameters()).dtype
    target = model if in_place or not (cast or export.format == "folded") else copy.deepcopy(model)
    if cast:
        cast_saved_tensors(target, dtype)
    reference = record_reference(target)
    fold, stored = None, None
    if export.format in ("masked", "compressed"):
        layouts = masked_layouts(report, config.nm is None)
        if export.format == "compressed":
            stored = compressed_tensors(target, layouts, config.nm, dtype)
    else:
        layouts, fold = fold_for_export(target, report, export.fallback)
        gathers = {name: entry.perm for name, entry in layouts.items() if entry.layout == "gather"}
        attach_gathers(target, gathers)
        try:
            ok, detail = compare_reference(model_logits(target, reference_input(reference, target)), reference)
        finally:
            remove_gathers(target)
        if not ok:
            raise RuntimeError(f"folded model does not reproduce the masked model's logits: {detail}")
        fold.verified = detail
    quant = getattr(config, "quant", None)
    staging = partial_dir(out)
    staging.mkdir(parents=True, exist_ok=True)
    if stored is None:
        target.save_pretrained(staging, max_shard_size=SHARD)
        storage = _dense_storage(target, layouts, dtype, config)
    else:
        tensors, specs, tied, stored_bytes, dense_bytes, digests = stored
        write_stored(staging, tensors, specs, tied, SHARD_BYTES)
        hf_config = copy.deepcopy(target.config)
        hf_config.dtype = dtype
        groups = sorted({spec.group for spec in specs.values() if spec.group is not None})
        group = groups[0] if len(groups) == 1 else None
        kinds = sorted({spec.quant for spec in specs.values() if spec.quant is not None})
        kind = quant.kind if _quantizes(config) else ("+".join(kinds) or "none")
        hf_config.quantization_config = quantization_config(config.pattern, _dtype_name(dtype), kind, group)
        hf_config.save_pretrained(staging)
        if getattr(target, "generation_config", None) is not None and target.can_generate():
            target.generation_config.save_pretrained(staging)
        storage = StorageRecord("compressed", _dtype_name(dtype), kind, group,
                                quant.method if _quantizes(config) else None, 0, stored_bytes, dense_bytes, digests)
    storage.weights_bytes = _weights_bytes(staging)
    plain = export.format != "compressed" and not any(entry.layout == "gather" for entry in layouts.values())
    record = CheckpointRecord(FORMAT_VERSION, package_version(), model_name, config, report, export.format, layouts,
                              fold, plain, reference, storage, blocks, dict(metrics or {}), list(zero_shot or []),
                              command)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    record.tensors = tensor_digests(staging)
    write_record(staging, record)
    shutil.rmtree(staging / ".resume", ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out

