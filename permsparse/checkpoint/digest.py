"""What a checkpoint holds, proven by content: the weight files read safely, a digest of every tensor.

At export, a sha256 of every tensor (its name, dtype, shape and bytes, read straight from the
safetensors files) goes into ``permsparse.json``; ``permsparse check`` computes them again, so a weight
changed after export fails the check whatever its effect on the logits. The digest of the record itself
(:func:`record_digest`, printed at export and by ``check``) pins the whole checkpoint: ``check --expect
DIGEST`` fails unless the record is the one the digest names, and the record names every tensor's digest.

Weight files are read only as safetensors: a folder holding pickled weights (``pytorch_model.bin``,
``*.pt``, ...) is refused before anything is loaded, and a truncated or corrupt safetensors file is
named (its header must describe exactly the bytes the file holds).
"""
from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from .record import FILENAME

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
HEADER_LIMIT = 100 * 2**20
CHUNK = 1 << 24


class WeightFileError(ValueError):
    """A weight file that is not read: a pickle, a truncated or corrupt safetensors file."""


def refuse_pickles(folder: str | Path) -> None:
    """Refuse a model folder holding pickled weights (never read: loading a pickle can run code)."""
    for path in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        if path.is_file() and path.suffix in PICKLE_SUFFIXES:
            raise WeightFileError(f"{path} holds pickled weights, which permsparse never reads (loading a pickle "
                                  "can run code): convert it to safetensors")


def safetensors_header(path: str | Path) -> dict:
    """The header of a safetensors file, checked against the file's size: every tensor's bytes present."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as file:
        start = file.read(8)
        if len(start) < 8:
            raise WeightFileError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        (length,) = struct.unpack("<Q", start)
        if length > min(HEADER_LIMIT, size - 8):
            raise WeightFileError(f"{path} is truncated or not a safetensors file (header of {length} bytes in a "
                                  f"file of {size})")
        try:
            header = json.loads(file.read(length))
        except ValueError as err:
            raise WeightFileError(f"{path} is corrupt: its safetensors header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{path} is corrupt: its safetensors header is not an object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = entry["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise WeightFileError(f"{path} is corrupt: tensor {name!r} has no data offsets") from None
        end = max(end, int(stop))
    if 8 + length + end != size:
        raise WeightFileError(f"{path} is truncated or corrupt: its header describes {8 + length + end} bytes, the "
                              f"file holds {size}")
    return header


def check_weight_files(folder: str | Path) -> list[Path]:
    """A model folder's safetensors files, each checked whole; pickles refused. Returns the files."""
    refuse_pickles(folder)
    files = sorted(Path(folder).glob("*.safetensors"))
    for path in files:
        safetensors_header(path)
    return files


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
