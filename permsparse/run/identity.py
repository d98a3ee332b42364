"""What a run's result depends on, as digests: the key under which its progress is saved and resumed.

Two runs may share progress only when everything that decides their result is the same: the model
(its config and every byte of its weights), the tokenizer, the calibration data (the bytes of every
file the calibration source reads, or the given windows), the config and the permsparse version.
:class:`ResumeKey` holds a digest of each, and :meth:`ResumeKey.differences` names the parts in
which two keys differ, so a refused resume says what changed.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .version import package_version

CHUNK = 1 << 24


@dataclass(frozen=True)
class ResumeKey:
    """Digests of everything that decides a run's result (see the module docstring)."""

    model: str
    tokenizer: str
    data: str
    config: str
    permsparse: str

    def differences(self, other: "ResumeKey") -> list[str]:
        """The parts in which ``other`` (the key found on disk) differs from this one, in words."""
        words = {"model": "another model", "tokenizer": "another tokenizer", "data": "other calibration data",
                 "config": "another configuration", "permsparse": "another permsparse version"}
        out = []
        for f in fields(self):
            here, there = getattr(self, f.name), getattr(other, f.name)
            if here != there:
                out.append(f"{words[f.name]}: {there[:16]} there, {here[:16]} here")
        return out


def permsparse_version() -> str:
    """The version that runs (:func:`permsparse.run.version.package_version`), installed or from a checkout."""
    return package_version()


def model_digest(model) -> str:
    """sha256 of the model's class, config (not the path it was loaded from) and every parameter and buffer
    (name, dtype, shape, bytes)."""
    import torch

    digest = hashlib.sha256(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):  # where it was loaded from is no part of it
        settings = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
            flat = tensor.detach().reshape(-1)
            for start in range(0, flat.numel(), CHUNK):
                digest.update(flat[start:start + CHUNK].cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenizer_digest(tokenizer) -> str:
    """sha256 of a tokenizer's full definition (a fast tokenizer's JSON, else its vocabulary and special
    tokens), or of an image processor's settings; of "none" without one."""
    if tokenizer is None:
        return _sha(b"none")
    text = getattr(tokenizer, "tokenizer", None)  # a processor: its text tokenizer and its own settings
    parts: list[Any] = [type(tokenizer).__name__]
    for part in (tokenizer, text):
        if part is None:
            continue
        backend = getattr(part, "backend_tokenizer", None)
        if backend is not None:
            parts.append(backend.to_str())
        elif hasattr(part, "get_vocab"):
            parts.append(sorted(part.get_vocab().items()))
        if hasattr(part, "special_tokens_map"):
            parts.append(sorted((k, str(v)) for k, v in part.special_tokens_map.items()))
        if hasattr(part, "to_json_string") and backend is None and not hasattr(part, "get_vocab"):
            parts.append(part.to_json_string())
    return _sha(json.dumps(parts, default=str).encode())


def tensors_digest(*tensors) -> str:
    """sha256 of given calibration tensors (windows, held-out windows, labels), None counted as absent."""
    import torch

    digest = hashlib.sha256(b"given")
    for tensor in tensors:
        if tensor is None:
            digest.update(b"none")
            continue
        for t in tensor if isinstance(tensor, tuple) else (tensor,):
            digest.update(f"{t.dtype}|{tuple(t.shape)}".encode())
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    hash_file_into(digest, Path(path))
    return digest.hexdigest()


def hash_file_into(digest, path: Path) -> None:
    with open(path, "rb") as file:
        while block := file.read(CHUNK):
            digest.update(block)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
