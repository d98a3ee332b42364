"""A model folder's weight files, read safely: only as safetensors, each checked whole before it is read.

A folder holding pickled weights (``pytorch_model.bin``, ``*.pt``, ...) is refused before anything is
loaded (loading a pickle can run code), and a truncated or corrupt safetensors file is named: its header
must describe exactly the bytes the file holds. ``--model`` folders and checkpoints are checked alike.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
HEADER_LIMIT = 100 * 2**20


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
