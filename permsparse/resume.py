"""Progress on disk, so an interrupted run resumes where it stopped: one format for every mode.

A run's folder holds ``progress.json`` (the fingerprint of the config that wrote it) and one file per
key (``blocks``: pruned blocks so far and the next block's inputs; ``stream-RANK``: each process's
inputs; ``starts``: searched warm starts; ``training`` and ``distill``: a learner's state; ``hidden``:
the global hidden permutation). Every file is written to a temporary name and renamed, so a crash
never leaves a half-written step behind, and progress of another configuration is refused rather than
mixed in.

A run folder may come from someone else, so reading it must never run code: each key is one
``KEY.safetensors`` file whose tensors are the value's tensors (named by their path in the value) and
whose header metadata holds the rest of the value as JSON. In that JSON a list is a list, scalars are
themselves, and every object is one tagged node: ``{"tensor": NAME}``, ``{"tuple": [...]}``,
``{"dict": [[KEY, VALUE], ...]}`` (so int keys stay ints) or ``{"record": CLASS, "fields": {...}}``,
a report record rebuilt by :func:`permsparse.serial.from_dict` from a fixed list of classes.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import distributed
from .report import DistillRecord, LayerRecord, PruneReport, QuantRecord, SiteRecord, TrainingRecord
from .serial import from_dict, to_dict

MANIFEST = "progress.json"
SUFFIX = ".safetensors"
TREE = "permsparse"  # the metadata entry holding the JSON of the value
RECORDS = {cls.__name__: cls for cls in (PruneReport, LayerRecord, SiteRecord, TrainingRecord, DistillRecord,
                                         QuantRecord)}


class Progress:
    """Keyed, atomic saves in ``folder`` for the run whose config has ``fingerprint``; a no-op without a folder."""

    def __init__(self, folder: str | Path | None, fingerprint: str):
        self.folder = None if folder is None else Path(folder)
        self.fingerprint = fingerprint
        if self.folder is None:
            return
        if any(self.folder.glob("*.pt")):
            raise FileExistsError(f"{self.folder} holds progress of an older permsparse (pickle files), which is "
                                  "never read: remove it or pass --overwrite")
        manifest = self.folder / MANIFEST
        if manifest.is_file():
            try:
                written_by = json.loads(manifest.read_text()).get("fingerprint")
            except (OSError, ValueError, AttributeError) as err:
                raise ValueError(f"{manifest} is not a readable progress manifest: {err}") from err
            if written_by != fingerprint:
                raise FileExistsError(f"{self.folder} holds progress of a run with another configuration; remove "
                                      "it or pass --overwrite")

    def load(self, key: str) -> Any | None:
        """What was saved under ``key`` (its tensors on the CPU), or None."""
        path = None if self.folder is None else self.folder / f"{key}{SUFFIX}"
        if path is None or not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as file:
                tree = json.loads((file.metadata() or {})[TREE])
                tensors = {name: file.get_tensor(name) for name in file.keys()}
            return decode(tree, tensors)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, RecursionError) as err:
            raise ValueError(f"{path} is not a readable progress file: {err!r}") from err

    def save(self, key: str, value: Any, every_rank: bool = False) -> None:
        """Save ``value`` under ``key``; the first save also records whose progress this is. With several
        processes rank 0 writes what every rank holds alike; ``every_rank`` saves are each process's own."""
        if self.folder is None or not (every_rank or distributed.is_main()):
            return
        manifest = self.folder / MANIFEST
        self.folder.mkdir(parents=True, exist_ok=True)
        if not manifest.is_file() and distributed.is_main():
            self._atomic(manifest, lambda p: p.write_text(json.dumps({"fingerprint": self.fingerprint})))
        tree, tensors = encode(value)
        metadata = {TREE: json.dumps(tree)}
        self._atomic(self.folder / f"{key}{SUFFIX}", lambda p: save_file(tensors, p, metadata=metadata))

    @staticmethod
    def _atomic(path: Path, write) -> None:
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        os.replace(tmp, path)


def encode(value: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``value`` as JSON-ready nodes, and its tensors by path (on the CPU, contiguous, each with storage
    of its own: safetensors refuses shared storage)."""
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()

    def node(value: Any, path: str) -> Any:
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            if tensor.untyped_storage().data_ptr() in storages:
                tensor = tensor.clone()
            storages.add(tensor.untyped_storage().data_ptr())
            name = path or "/"
            while name in tensors:  # a dict key holding "/" can repeat another value's path
                name += "'"
            tensors[name] = tensor
            return {"tensor": name}
        if isinstance(value, list):
            return [node(v, f"{path}/{i}") for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {"tuple": [node(v, f"{path}/{i}") for i, v in enumerate(value)]}
        if isinstance(value, dict):
            if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value):
                raise TypeError(f"progress at {path or '/'}: dict keys must be str or int")
            return {"dict": [[k, node(v, f"{path}/{k}")] for k, v in value.items()]}
        if dataclasses.is_dataclass(value) and RECORDS.get(type(value).__name__) is type(value):
            return {"record": type(value).__name__, "fields": to_dict(value)}
        raise TypeError(f"progress at {path or '/'}: cannot save a {type(value).__name__}")

    return node(value, ""), tensors


def decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The value :func:`encode` turned into ``node``."""
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [decode(v, tensors) for v in node]
    if isinstance(node, dict) and len(node) == 1 and "tensor" in node:
        return tensors[node["tensor"]]
    if isinstance(node, dict) and len(node) == 1 and isinstance(node.get("tuple"), list):
        return tuple(decode(v, tensors) for v in node["tuple"])
    if isinstance(node, dict) and len(node) == 1 and isinstance(node.get("dict"), list):
        return {_key(k): decode(v, tensors) for k, v in node["dict"]}
    if isinstance(node, dict) and node.keys() == {"record", "fields"}:
        if node["record"] not in RECORDS:
            raise ValueError(f"record class {node['record']!r} is not one of {sorted(RECORDS)}")
        return from_dict(RECORDS[node["record"]], node["fields"])
    raise ValueError(f"unknown node {str(node)[:80]}")


def _key(key: Any) -> str | int:
    if isinstance(key, bool) or not isinstance(key, (str, int)):
        raise ValueError(f"dict key {key!r} is neither str nor int")
    return key


def pack_mask(mask: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """A bool mask as its shape and its bits (uint8, one eighth of its size)."""
    return list(mask.shape), torch.from_numpy(np.packbits(mask.cpu().numpy().ravel()))


def unpack_mask(packed: tuple[list[int], torch.Tensor]) -> torch.Tensor:
    shape, bits = packed
    return torch.from_numpy(np.unpackbits(bits.cpu().numpy())[: int(np.prod(shape))].reshape(shape).astype(bool))
