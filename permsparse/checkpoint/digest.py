"""What a checkpoint holds, proven by content: the weight files read safely, a digest of every tensor.

At export, a sha256 of every tensor (its name, dtype, shape and bytes, read straight from the
safetensors files) goes into ``permsparse.json``; ``permsparse check`` computes them again, so a weight
changed after export fails the check whatever its effect on the logits. The digest of the record itself
(:func:`record_digest`, printed at export and by ``check``) pins the whole checkpoint: ``check --expect
DIGEST`` fails unless the record is the one the digest names, and the record names every tensor's digest.

Weight files are read only as safetensors (:mod:`permsparse.models.weight_files`).
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from ..models.weight_files import WeightFileError, check_weight_files, safetensors_header
from .record import FILENAME

CHUNK = 1 << 24


def tensor_digests(folder: str | Path) -> dict[str, str]:
    """sha256 of every tensor in a folder's safetensors files: name, dtype, shape and bytes."""
    digests = {}
    for path in check_weight_files(folder):
        header = safetensors_header(path)
        with open(path, "rb") as file:
            (size,) = struct.unpack("<Q", file.read(8))
            base = 8 + size
            for name, entry in sorted(header.items()):
                if name == "__metadata__":
                    continue
                begin, stop = entry["data_offsets"]
                digest = hashlib.sha256(f"{name}|{entry['dtype']}|{list(entry['shape'])}|".encode())
                file.seek(base + begin)
                remaining = stop - begin
                while remaining:
                    block = file.read(min(CHUNK, remaining))
                    if not block:
                        raise WeightFileError(f"{path} is truncated at tensor {name!r}")
                    digest.update(block)
                    remaining -= len(block)
                if name in digests:
                    raise WeightFileError(f"tensor {name!r} is stored twice in {folder}")
                digests[name] = digest.hexdigest()
    return digests


def record_digest(folder: str | Path) -> str:
    """sha256 of a checkpoint's ``permsparse.json``: pins the record, and through it every tensor."""
    return hashlib.sha256((Path(folder) / FILENAME).read_bytes()).hexdigest()


def compare_digests(recorded: dict[str, str], found: dict[str, str]) -> list[str]:
    """Failures, in words, of the tensors found against those recorded at export."""
    failures = [f"tensor {name}: its content differs from the digest recorded at export"
                for name in sorted(recorded.keys() & found.keys()) if recorded[name] != found[name]]
    failures += [f"tensor {name}: recorded at export, missing from the weight files"
                 for name in sorted(recorded.keys() - found.keys())]
    failures += [f"tensor {name}: in the weight files, not recorded at export"
                 for name in sorted(found.keys() - recorded.keys())]
    return failures
