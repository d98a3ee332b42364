"""Writing a pruned model as a checkpoint: a plain Hugging Face folder plus ``permsparse.json``.

Two formats (docs/method.md, "Checkpoints"):

- ``masked``: every pruned linear stores ``W * unpermute(mask)`` in the original column order. It is
  N:M only *through* its permutation (``W[:, p]`` is N:M). ``from_pretrained(DIR)`` loads it anywhere.
- ``folded``: every permutation that folds exactly into its producers (:mod:`.fold`) is folded, so those
  linears are N:M **in storage order** (what 2:4 GPU kernels need) and the model computes the same
  function. A linear that cannot fold stays masked (``fallback="masked"``; the folder stays a plain,
  exact HF checkpoint) or is stored permuted with the permutation recorded (``fallback="gather"``;
  then only :func:`permsparse.checkpoint.load.load` gives correct outputs, as it re-attaches the
  runtime input gather).

Everything is written into ``DIR.partial`` and renamed at the end: a folder named ``DIR`` is complete.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

from torch import nn

from ..config import ExportConfig, PruneConfig  # ExportConfig re-exported: light to import with the other configs
from ..evaluate.measures import Perplexity, Similarity
from ..data.images import Accuracy
from ..report import PruneReport
from ..evaluate.zeroshot import TaskResult
from ..run.version import package_version
from .digest import tensor_digests
from .fold import fold_for_export, masked_layouts
from .load import attach_gathers, remove_gathers
from .record import FORMAT_VERSION, CheckpointRecord, write_record
from .reference import compare_reference, model_logits, record_reference, reference_input


# Largest weight file written at once: safetensors copies one file's tensors from the GPU to the host before
# writing, so a model on a GPU costs the host this much, never a second copy of the whole model.
SHARD = "2GB"


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


def export_checkpoint(model: nn.Module, tokenizer, out: str | Path, config: PruneConfig, report: PruneReport, *,
                      export: ExportConfig = ExportConfig(), model_name: str = "",
                      metrics: dict[str, Perplexity | Similarity | Accuracy] | None = None,
                      zero_shot: list[TaskResult] | None = None, command: str = "", overwrite: bool = False,
                      in_place: bool = False) -> Path:
    """Write the pruned (masked, in-memory) ``model`` to ``out`` as ``export`` says.

    The reference logits are recorded from ``model`` before folding; the folded model (gathers
    attached) must reproduce them or nothing is written. The folded export works on a deep copy unless
    ``in_place``, which saves memory but leaves ``model`` folded (and, with ``fallback="gather"``, wrong
    without its gathers).
    """
    out = Path(out)
    check_export(export, config)
    check_output_free(out, overwrite)
    reference = record_reference(model)
    target, fold = model, None
    if export.format == "masked":
        layouts = masked_layouts(report, config.nm is None)
    else:
        target = model if in_place else copy.deepcopy(model)
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
    record = CheckpointRecord(FORMAT_VERSION, package_version(), model_name, config, report, export.format, layouts, fold,
                              not any(entry.layout == "gather" for entry in layouts.values()), reference,
                              dict(metrics or {}), list(zero_shot or []), command)
    staging = partial_dir(out)
    staging.mkdir(parents=True, exist_ok=True)
    target.save_pretrained(staging, max_shard_size=SHARD)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    record.tensors = tensor_digests(staging)
    write_record(staging, record)
    shutil.rmtree(staging / ".resume", ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out

