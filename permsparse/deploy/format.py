"""The compressed N:M layout: the kept values of every group of M inputs and their packed positions.

A weight ``(out, in)`` that is N:M in storage order keeps at most N of every M consecutive inputs. It is
stored as

- ``values`` ``(out, in * N / M)``, any dtype (the weight's, or quantization codes): the N kept entries of
  every group, in column order;
- ``positions`` ``(out, ceil(in * N / M * b / 8))`` uint8, ``b = ceil(log2 M)`` bits per kept entry: the
  position of every kept entry within its group, increasing within the group, packed least significant
  bits first, row by row (a row's last byte padded with zero bits).

A group with fewer than N non-zeros keeps zeros at its lowest zero positions, so every group names N
distinct positions and ``decompress_nm(*compress_nm(w, n, m), n, m)`` equals ``w`` exactly.

For 2:4 a group's two 2-bit positions make the 4-bit code ``i0 | i1 << 2``, two groups a byte (the even
group in the low nibble): the layout the Triton kernel reads (:func:`compress`, :func:`decompress`, widths
a multiple of 8). For fp16 and bf16 that is 56.25% of the dense bytes (values 50%, positions 6.25%) – what a
memory-bound decode step reads.
"""
from __future__ import annotations

import math

import torch

from ..sparsity.masks import nm_violation

__all__ = ["compress", "compress_nm", "decompress", "decompress_nm", "format_problem", "nm_problem", "pack_int4",
           "position_bits", "position_bytes", "position_problem", "unpack_int4"]

# Rows expanded at once: bounds the int64 scatter index of a wide weight to a few megabytes.
_CHUNK_ENTRIES = 1 << 16


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7] two a byte, the even column in the low nibble (a last odd column padded): for 2:4
    kept values, one byte holds the two kept entries of one group."""
    nibbles = (codes & 15).to(torch.uint8)
    nibbles = torch.nn.functional.pad(nibbles, (0, nibbles.shape[1] % 2))
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    """The ``(rows, count)`` int8 codes :func:`pack_int4` packed."""
    nibbles = torch.stack([packed & 15, packed >> 4], -1).reshape(packed.shape[0], -1)[:, :count]
    return (nibbles.to(torch.int8) ^ 8) - 8


def position_bits(m: int) -> int:
    """Bits per kept entry that name its position within a group of ``m``."""
    return max(1, math.ceil(math.log2(m)))


def position_bytes(out_features: int, in_features: int, n: int, m: int) -> tuple[int, int]:
    """Shape of the packed positions of an ``(out, in)`` weight kept N:M."""
    return out_features, math.ceil(in_features // m * n * position_bits(m) / 8)


def nm_problem(weight: torch.Tensor, n: int, m: int) -> str:
    """Why ``weight`` cannot be stored N:M ("" when it can): not 2-D, a width that is not a multiple of M, or
    a group with more than N non-zeros (the first one named)."""
    if weight.dim() != 2:
        return f"an N:M weight is 2-D (out, in); this one has shape {tuple(weight.shape)}"
    if weight.shape[1] % m:
        return f"in_features {weight.shape[1]} is not a multiple of {m}"
    violation = nm_violation(weight, n, m)
    return f"not {n}:{m} in storage order: {violation}" if violation else ""


def _pack(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """``(rows, k)`` integers below ``2**bits`` packed least significant bits first into ``(rows, bytes)``."""
    rows, k = indices.shape
    shifts = torch.arange(bits, dtype=torch.uint8, device=indices.device)
    planes = ((indices.to(torch.uint8).unsqueeze(-1) >> shifts) & 1).reshape(rows, k * bits)
    planes = torch.nn.functional.pad(planes, (0, -(k * bits) % 8))
    weights = torch.arange(8, dtype=torch.uint8, device=indices.device)
    return (planes.reshape(rows, -1, 8) << weights).sum(-1, dtype=torch.uint8)


def _unpack(packed: torch.Tensor, k: int, bits: int) -> torch.Tensor:
    """The ``(rows, k)`` uint8 integers :func:`_pack` packed."""
    rows = packed.shape[0]
    if 8 % bits == 0:  # whole entries per byte: one shift per slot
        per = 8 // bits
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        return ((packed.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(rows, packed.shape[1] * per)[:, :k]
    planes = (packed.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    planes = planes.reshape(rows, -1)[:, : k * bits].reshape(rows, k, bits)
    return (planes << torch.arange(bits, dtype=torch.uint8, device=packed.device)).sum(-1, dtype=torch.uint8)


def _raw(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself, or a float8 tensor's bytes (gather and scatter have no float8 kernels)."""
    return tensor.view(torch.uint8) if tensor.dtype.itemsize == 1 and tensor.dtype.is_floating_point else tensor


def compress_nm(weight: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, positions)`` of a weight that is N:M in storage order; ValueError (naming the first bad
    group) otherwise."""
    problem = nm_problem(weight, n, m)
    if problem:
        raise ValueError(problem)
    out, width = weight.shape
    groups = weight.reshape(out, width // m, m)
    # non-zeros first, then zeros, each by position: the first n are the kept positions
    rank = (groups == 0).to(torch.int16) * m + torch.arange(m, dtype=torch.int16, device=weight.device)
    kept = rank.argsort(-1)[..., :n].sort(-1).values
    values = _raw(groups).gather(-1, kept).reshape(out, width // m * n).view(weight.dtype)
    return values.contiguous(), _pack(kept.reshape(out, -1), position_bits(m))


def unpack_positions(positions: torch.Tensor, kept: int, m: int) -> torch.Tensor:
    """The ``(out, kept)`` uint8 positions within their groups of packed ``positions``."""
    return _unpack(positions, kept, position_bits(m))


def position_problem(positions: torch.Tensor, kept: int, n: int, m: int, first_row: int = 0) -> str:
    """Why packed ``positions`` of ``kept`` entries per row name no valid N:M pattern ("" when they do): a
    position outside its group, or positions not strictly increasing within a group (which would keep fewer
    than N distinct entries, or one entry twice). Rows are named from ``first_row`` (a slice of a weight)."""
    within = unpack_positions(positions, kept, m).reshape(positions.shape[0], -1, n).to(torch.int16)
    outside = within >= m
    if outside.any():
        row, group, _ = outside.nonzero()[0].tolist()
        return (f"position {int(within[row, group].max())} outside its group of {m} (row {row + first_row}, "
                f"group {group})")
    repeated = (within[..., 1:] <= within[..., :-1]).any(-1)
    if repeated.any():
        row, group = repeated.nonzero()[0].tolist()
        return (f"positions {within[row, group].tolist()} of row {row + first_row}, group {group} are not {n} distinct "
                f"increasing positions")
    return ""


def decompress_nm(values: torch.Tensor, positions: torch.Tensor, n: int, m: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense ``(rows, in)`` weight of ``(values, positions)``, written into ``out`` when given (any
    ``(rows, in)`` view, e.g. a transposed one, of the values' dtype)."""
    rows, kept = values.shape
    if kept % n:
        raise ValueError(f"values of shape {tuple(values.shape)} do not hold whole groups of {n}")
    width = kept // n * m
    expected = position_bytes(rows, width, n, m)
    if positions.dtype != torch.uint8 or tuple(positions.shape) != expected:
        raise ValueError(f"positions of shape {tuple(positions.shape)} ({positions.dtype}) do not match values of "
                         f"shape {tuple(values.shape)}: expected {expected} uint8")
    dense = values.new_empty(rows, width) if out is None else out
    raw, target = _raw(values), _raw(dense)
    step = max(1, _CHUNK_ENTRIES // max(kept, 1))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        index = unpack_positions(positions[start:stop], kept, m).reshape(stop - start, -1, n).long()
        chunk = raw.new_zeros(stop - start, width // m, m)
        chunk.scatter_(-1, index, raw[start:stop].reshape(stop - start, -1, n))
        target[start:stop] = chunk.reshape(stop - start, width)
    return dense


def format_problem(weight: torch.Tensor) -> str:
    """Why ``weight`` cannot be stored in the 2:4 layout the Triton kernel reads ("" when it can): not 2-D, a
    width the metadata bytes do not tile, or a group of 4 with more than 2 non-zeros (the first one named)."""
    if weight.dim() != 2:
        return f"a 2:4 weight is 2-D (out, in); this one has shape {tuple(weight.shape)}"
    if weight.shape[1] % 8:
        return f"in_features {weight.shape[1]} is not a multiple of 8 (one metadata byte holds two groups of 4)"
    return nm_problem(weight, 2, 4)


def compress(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, meta)`` of a weight that is 2:4 in storage order, the kernel's layout (``meta`` ``(out,
    in/8)`` uint8); ValueError (naming the first bad group) otherwise."""
    problem = format_problem(weight)
    if problem:
        raise ValueError(problem)
    return compress_nm(weight, 2, 4)


def decompress(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense ``(out, in)`` weight of the kernel's ``(values, meta)``."""
    out, half = values.shape
    if meta.dtype != torch.uint8 or tuple(meta.shape) != (out, half // 4):
        raise ValueError(f"metadata of shape {tuple(meta.shape)} ({meta.dtype}) does not match values of shape "
                         f"{tuple(values.shape)}: expected ({out}, {half // 4}) uint8")
    return decompress_nm(values, meta, 2, 4)
