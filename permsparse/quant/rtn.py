"""Round-to-nearest quantization of a weight in storage order: symmetric scales, codes, fake quantization.

Every kind is symmetric (no zero point), so a zero weight is a zero code and a pruned entry stays pruned:

- ``int8``: codes in [-127, 127], one scale per output channel (or per group), ``max|w| / 127``;
- ``fp8``: ``float8_e4m3fn`` codes, scale ``max|w| / 448`` so the largest weight maps to e4m3's largest
  finite value; rounding is the cast's round-to-nearest-even;
- ``int4``: codes in [-8, 7], one scale per group of consecutive stored inputs, ``max|w| / 7`` shrunk by the
  clip that minimises the group's squared rounding error (:func:`scales`), since a 4-bit grid is coarse
  enough that clipping the largest weight a little lowers the error of all the others.

Groups run along the stored (permuted) input order: the caller passes ``W[:, input_order]``.
"""
from __future__ import annotations

import torch

from . import QuantizedWeight

FP8_MAX = 448.0
# int4 clip search: the scale max|w|/7 times each of these, per group, keeping the one with the least error.
CLIP_GRID = tuple(1.0 - 0.05 * k for k in range(9))


def code_limit(kind: str) -> float:
    """The largest code magnitude of ``kind``."""
    return {"int8": 127.0, "fp8": FP8_MAX, "int4": 7.0}[kind]


def to_codes(values: torch.Tensor, kind: str) -> torch.Tensor:
    """``values`` (weights already divided by their scales) rounded to codes of ``kind``, clamped to its range."""
    if kind == "fp8":
        return values.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    low = -8.0 if kind == "int4" else -127.0
    return values.round().clamp(low, code_limit(kind)).to(torch.int8)


def _grouped(weight: torch.Tensor, group: int) -> torch.Tensor:
    out, width = weight.shape
    return weight.reshape(out, width // group, group)


def scales(weight: torch.Tensor, kind: str, group: int) -> torch.Tensor:
    """Scales ``(out, in // group)`` (float32 holding bfloat16 values) of ``weight`` (storage order): the largest
    magnitude of each group over the code limit, rounded up to bfloat16; int4 also searches :data:`CLIP_GRID`
    for the clip with the least squared rounding error per group. An all-zero group gets scale 1 (its codes
    are 0 either way)."""
    w = _grouped(weight.float(), group)
    peak = w.abs().amax(-1) / code_limit(kind)
    peak = torch.where(peak > 0, peak, torch.ones_like(peak))
    if kind != "int4":
        return bfloat16_ceiling(peak)
    best, best_error = None, None
    for clip in CLIP_GRID:
        candidate = bfloat16_ceiling(peak * clip)
        error = (to_codes(w / candidate[..., None], kind).float() * candidate[..., None] - w).square().sum(-1)
        if best is None:
            best, best_error = candidate, error
        else:
            better = error < best_error
            best, best_error = torch.where(better, candidate, best), torch.where(better, error, best_error)
    return best


def bfloat16_ceiling(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` rounded up to the nearest bfloat16 value (kept as float32): a checkpoint stores the scales in
    bfloat16 without changing one dequantized weight, and no weight moves past its grid's end by rounding."""
    rounded = scale.to(torch.bfloat16)
    up = torch.nextafter(rounded, torch.full_like(rounded, float("inf")))
    return torch.where(rounded.float() < scale, up, rounded).float()


def quantize(stored: torch.Tensor, kind: str, group: int, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Codes of ``stored`` (``(out, in)``, storage order) on ``scale`` (default :func:`scales`)."""
    scale = scales(stored, kind, group) if scale is None else scale
    return to_codes(stored.float() / scale.repeat_interleave(group, dim=1), kind).reshape(stored.shape)


def rtn(weight: torch.Tensor, kind: str, group: int, input_order: torch.Tensor | None = None) -> QuantizedWeight:
    """``weight`` (original input order) quantized to nearest, in the storage order ``input_order``."""
    stored = weight if input_order is None else weight[:, input_order]
    scale = scales(stored, kind, group)
    return QuantizedWeight(kind, quantize(stored, kind, group, scale), scale, group, input_order)


def fake_quantize(weight: torch.Tensor, kind: str, group: int, input_order: torch.Tensor | None = None) -> torch.Tensor:
    """``weight`` as its round-to-nearest dequantization (groups in ``input_order``), with the gradient of the
    identity (straight-through estimator): training sees the deployed values and still gets a gradient."""
    with torch.no_grad():
        deployed = rtn(weight.detach(), kind, group, input_order).weight(torch.float32).to(weight.dtype)
    return weight + (deployed - weight).detach()
