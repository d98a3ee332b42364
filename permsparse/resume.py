"""Progress on disk, so an interrupted run resumes where it stopped: one format for every mode.

A run's folder holds ``progress.json`` (the fingerprint of the config that wrote it) and one file per
key (``blocks``: pruned blocks so far and the next block's inputs; ``starts``: searched warm starts;
``training``: the learner's state; ``hidden``: the global hidden permutation). Every file is written
to a temporary name and renamed, so a crash never leaves a half-written step behind, and progress of
another configuration is refused rather than mixed in.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import distributed

MANIFEST = "progress.json"


class Progress:
    """Keyed, atomic saves in ``folder`` for the run whose config has ``fingerprint``; a no-op without a folder."""

    def __init__(self, folder: str | Path | None, fingerprint: str):
        self.folder = None if folder is None else Path(folder)
        self.fingerprint = fingerprint
        if self.folder is None:
            return
        manifest = self.folder / MANIFEST
        if manifest.is_file() and json.loads(manifest.read_text()).get("fingerprint") != fingerprint:
            raise FileExistsError(f"{self.folder} holds progress of a run with another configuration; remove it "
                                  "or pass --overwrite")

    def load(self, key: str) -> Any | None:
        """What was saved under ``key``, or None."""
        if self.folder is None or not (self.folder / f"{key}.pt").is_file():
            return None
        return torch.load(self.folder / f"{key}.pt", weights_only=False)

    def save(self, key: str, value: Any, every_rank: bool = False) -> None:
        """Save ``value`` under ``key``; the first save also records whose progress this is. With several
        processes rank 0 writes what every rank holds alike; ``every_rank`` saves are each process's own."""
        if self.folder is None or not (every_rank or distributed.is_main()):
            return
        manifest = self.folder / MANIFEST
        self.folder.mkdir(parents=True, exist_ok=True)
        if not manifest.is_file() and distributed.is_main():
            self._atomic(manifest, lambda p: p.write_text(json.dumps({"fingerprint": self.fingerprint})))
        self._atomic(self.folder / f"{key}.pt", lambda p: torch.save(value, p))

    @staticmethod
    def _atomic(path: Path, write) -> None:
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        os.replace(tmp, path)


def pack_mask(mask: torch.Tensor) -> tuple[list[int], np.ndarray]:
    """A bool mask as its shape and bits (one eighth of its size)."""
    return list(mask.shape), np.packbits(mask.cpu().numpy().ravel())


def unpack_mask(packed: tuple[list[int], np.ndarray]) -> torch.Tensor:
    shape, bits = packed
    return torch.from_numpy(np.unpackbits(bits)[: int(np.prod(shape))].reshape(shape).astype(bool))
