"""Quantization of the weights a pruning keeps: what a quantized linear is, as one typed record.

A :class:`QuantizedWeight` is what the quantizers (:mod:`.rtn`, :mod:`.gptq` over the kept N:M entries) hand to the
checkpoint writer and what the loader reads back. Quantization is symmetric (no zero point), so a pruned
entry stays exactly zero after quantization and N:M storage of the codes is lossless.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("int8", "fp8", "int4")


@dataclass
class QuantizedWeight:
    """A linear's weight as codes times scales, in storage order.

    ``codes`` has the weight's shape ``(out, in)`` in storage order: int8 for ``int8`` and ``int4``
    (int4 codes lie in [-8, 7]), ``torch.float8_e4m3fn`` for ``fp8``; a pruned entry's code is 0.
    ``scales`` is float32 of shape ``(out, in // group)``: one scale per output channel and run of
    ``group`` consecutive inputs (``group == in`` is one scale per output channel). ``input_order``,
    when given, says which input channel each stored column reads (``weight[:, input_order] ==
    dequantize()``): the column order the N:M groups and the quantization groups were chosen in.
    """

    kind: str
    codes: torch.Tensor
    scales: torch.Tensor
    group: int
    input_order: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"quantization kind {self.kind!r} is not one of {', '.join(KINDS)}")
        out_features, in_features = self.codes.shape
        if self.group <= 0 or in_features % self.group:
            raise ValueError(f"quantization group {self.group} does not divide the input width {in_features}")
        if tuple(self.scales.shape) != (out_features, in_features // self.group):
            raise ValueError(f"scales of shape {tuple(self.scales.shape)} for codes {tuple(self.codes.shape)} "
                             f"in groups of {self.group}")

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in storage order: every code times its group's scale."""
        scales = self.scales.to(torch.float32).repeat_interleave(self.group, dim=1)
        return (self.codes.to(torch.float32) * scales).to(dtype)

    def weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight in the linear's own input order (storage order undone by ``input_order``)."""
        stored = self.dequantize(dtype)
        if self.input_order is None:
            return stored
        weight = torch.empty_like(stored)
        weight[:, self.input_order] = stored
        return weight


ATTRIBUTE = "permsparse_quantized"  # where a quantized linear module carries its record


def attach(module: torch.nn.Module, quantized: QuantizedWeight) -> None:
    """Give a linear ``module`` its quantized record: the codes and scales its weight is the dequantization of."""
    setattr(module, ATTRIBUTE, quantized)


def quantized_linears(model: torch.nn.Module) -> dict[str, QuantizedWeight]:
    """Every quantized linear of ``model`` by full module name, with its record (see :func:`attach`)."""
    return {name: getattr(module, ATTRIBUTE) for name, module in model.named_modules() if hasattr(module, ATTRIBUTE)}
