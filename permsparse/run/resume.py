"""Progress on disk, so an interrupted run resumes where it stopped: one format for every mode.

A run's folder holds one manifest, ``progress.json``, and the value files it names: ``blocks`` (pruned
blocks so far), ``stream-RANK`` (each process's next inputs), ``starts`` (searched warm starts),
``training`` and ``distill`` (a learner's state), ``hidden`` (the global hidden permutation). A step is
committed by writing its value files under new names, syncing them to disk, then writing the manifest
that names them to a temporary file, syncing it and renaming it over the old one: the rename is the
one commit point, so a process killed at any moment leaves the last committed step whole (the files the
old manifest names are removed only after the new one is in place). Several values saved together
(the pruned blocks and every process's inputs) commit together.

The manifest also holds the run's :class:`~permsparse.run.identity.ResumeKey` (the model, tokenizer,
calibration data, config and permsparse version that wrote it): progress of another run is refused,
naming what differs, rather than mixed in.

A run folder may come from someone else, so reading it must never run code: each value is one
``.safetensors`` file whose tensors are the value's tensors (named by their path in the value) and
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
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import distributed
from ..report import DistillRecord, LayerRecord, PruneReport, QuantRecord, SiteRecord, TrainingRecord
from ..serial import RecordError, from_dict, to_dict
from .identity import ResumeKey

MANIFEST = "progress.json"
MANIFEST_FORMAT = 2
SUFFIX = ".safetensors"
TREE = "permsparse"  # the metadata entry holding the JSON of the value
RECORDS = {cls.__name__: cls for cls in (PruneReport, LayerRecord, SiteRecord, TrainingRecord, DistillRecord,
                                         QuantRecord)}

# Called at every point of a write where a process could die (``point``, the file concerned); tests set it
# to kill the write there. None in normal use.
fault: Callable[[str, Path], None] | None = None


def _at(point: str, path: Path) -> None:
    if fault is not None:
        fault(point, path)


def _sync_file(path: Path) -> None:
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Progress:
    """Atomic, keyed saves in ``folder`` for the run ``key`` identifies; a no-op without a folder.

    ``key`` None reads a folder without checking whose progress it is (and cannot save).
    """

    def __init__(self, folder: str | Path | None, key: ResumeKey | None):
        self.folder = None if folder is None else Path(folder)
        self.key = key
        self.files: dict[str, str] = {}  # committed value files, by key
        self.generation = 0
        self.note = ""  # what the committed progress holds, in words ("3 of 30 blocks pruned")
        if self.folder is None:
            return
        if any(self.folder.glob("*.pt")):
            raise FileExistsError(f"{self.folder} holds progress of an older permsparse (pickle files), which is "
                                  "never read: remove it or pass --overwrite")
        manifest = self.folder / MANIFEST
        if not manifest.is_file():
            return
        try:
            data = json.loads(manifest.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            if data.get("format") != MANIFEST_FORMAT:
                raise FileExistsError(f"{self.folder} holds progress of an older permsparse (manifest format "
                                      f"{data.get('format')!r}), which is never mixed in: remove it or pass --overwrite")
            written_by = from_dict(ResumeKey, data["key"], f"{manifest}: key")
            files = {str(k): str(v) for k, v in dict(data["files"]).items()}
            generation, note = int(data["generation"]), str(data.get("note", ""))
        except (OSError, ValueError, KeyError, TypeError, RecordError) as err:
            if isinstance(err, FileExistsError):
                raise
            raise ValueError(f"{manifest} is not a readable progress manifest: {err}") from err
        if key is not None:
            differences = key.differences(written_by)
            if differences:
                raise FileExistsError(f"{self.folder} holds progress of another run ({'; '.join(differences)}): "
                                      "remove it or pass --overwrite")
        self.files, self.generation, self.note = files, generation, note
        if distributed.world() == 1:
            self._remove_uncommitted()

    @property
    def resumed(self) -> bool:
        """Whether committed progress was found."""
        return bool(self.files)

    def load(self, key: str) -> Any | None:
        """What was committed under ``key`` (its tensors on the CPU), or None."""
        name = self.files.get(key)
        if self.folder is None or name is None:
            return None
        path = self.folder / name
        try:
            with safe_open(path, framework="pt") as file:
                tree = json.loads((file.metadata() or {})[TREE])
                tensors = {name: file.get_tensor(name) for name in file.keys()}
            return decode(tree, tensors)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, RecursionError) as err:
            raise ValueError(f"{path} is not a readable progress file: {err!r}") from err

    def save(self, key: str, value: Any, note: str = "") -> None:
        """Commit ``value`` under ``key`` (rank 0's: with several processes it holds what every rank holds alike)."""
        self.commit({key: value}, note=note)

    def commit(self, shared: dict[str, Any], own: dict[str, Any] | None = None, tag: str = "",
               note: str = "") -> None:
        """Commit ``shared`` (rank 0's) and every process's ``own`` values (saved as ``KEY-RANK``, each file
        named by ``tag``, which every process gives alike) as one step: after a kill either all of them or
        none is the committed progress. Every process calls this when ``own`` is given."""
        if self.folder is None:
            return
        if self.key is None:
            raise ValueError("progress opened without a resume key is read-only")
        self.folder.mkdir(parents=True, exist_ok=True)
        rank, world = distributed.rank(), distributed.world()
        for key, value in (own or {}).items():
            self._write(f"{key}-{rank}.{tag}{SUFFIX}", value)
        if own:
            distributed.barrier()
        if not distributed.is_main():
            return
        self.generation += 1
        files = dict(self.files)
        for key, value in shared.items():
            files[key] = f"{key}.{self.generation}{SUFFIX}"
            self._write(files[key], value)
        for key in own or {}:
            files.update({f"{key}-{r}": f"{key}-{r}.{tag}{SUFFIX}" for r in range(world)})
        manifest = self.folder / MANIFEST
        tmp = manifest.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps({"format": MANIFEST_FORMAT, "key": to_dict(self.key), "generation": self.generation,
                                   "files": files, "note": note or self.note}, indent=1))
        _at("manifest written", tmp)
        _sync_file(tmp)
        _at("manifest synced", tmp)
        os.replace(tmp, manifest)
        _at("manifest renamed", manifest)
        _sync_dir(self.folder)
        _at("folder synced", self.folder)
        old = set(self.files.values()) - set(files.values())
        self.files, self.note = files, note or self.note
        for name in sorted(old):
            (self.folder / name).unlink(missing_ok=True)
            _at("old file removed", self.folder / name)

    def _write(self, name: str, value: Any) -> None:
        """``value`` as the file ``name``, synced; no manifest names it yet."""
        tree, tensors = encode(value)
        path = self.folder / name
        save_file(tensors, path, metadata={TREE: json.dumps(tree)})
        _at("file written", path)
        _sync_file(path)
        _at("file synced", path)

    def _remove_uncommitted(self) -> None:
        """Files a killed process wrote but never committed (one process only: others may be writing)."""
        named = set(self.files.values()) | {MANIFEST}
        for path in self.folder.iterdir():
            if path.is_file() and path.name not in named and (path.suffix == SUFFIX or path.name.endswith(".tmp")):
                path.unlink(missing_ok=True)


def has_progress(folder: str | Path) -> bool:
    """Whether ``folder`` (a run's resume folder, or a folder above it) holds committed progress."""
    folder = Path(folder)
    return folder.is_dir() and any(folder.rglob(MANIFEST))


def saved_notes(folder: str | Path) -> list[str]:
    """What the committed progress under ``folder`` holds, in words, one entry per manifest."""
    notes = []
    for manifest in sorted(Path(folder).rglob(MANIFEST)) if Path(folder).is_dir() else []:
        try:
            notes.append(str(json.loads(manifest.read_text()).get("note", "")) or "progress")
        except (OSError, ValueError, AttributeError):
            notes.append("progress")
    return notes


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
