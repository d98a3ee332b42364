"""Writing pruned checkpoints: a plain Hugging Face folder plus ``permsparse.json``.

The ``masked`` format stores ``W * unpermute(mask)`` in the original column order, so
``AutoModelForCausalLM.from_pretrained(DIR)`` loads it anywhere. Everything is written into
``DIR.partial`` and renamed at the end: a folder named ``DIR`` is always complete.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from torch import nn

METADATA = "permsparse.json"


def partial_dir(out: str | Path) -> Path:
    """Where a run writes (and keeps resume state) until it is complete."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def check_output_free(out: str | Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless told to overwrite; call before any long work."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {out} exists; pass --overwrite to replace it")


def save_checkpoint(model: nn.Module, tokenizer, out: str | Path, metadata: dict, overwrite: bool = False) -> Path:
    """Save model, tokenizer and metadata into ``out`` atomically (via ``out.partial``)."""
    out = Path(out)
    check_output_free(out, overwrite)
    staging = partial_dir(out)
    staging.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    (staging / METADATA).write_text(json.dumps(metadata, indent=1))
    shutil.rmtree(staging / ".resume", ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def read_metadata(folder: str | Path) -> dict:
    path = Path(folder) / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {METADATA}: not a permsparse checkpoint")
    return json.loads(path.read_text())
