"""The deployed 4-bit 2:4 linear: int4 group codes, 2-bit positions and group scales, never a dense weight kept.

:class:`Int4Linear24` holds a linear as a compressed checkpoint stores it when quantized to int4 and kept 2:4
(:mod:`permsparse.checkpoint.compressed`): ``codes`` ``(out, in/4)`` uint8 (a group's two kept codes, the first in
the low nibble), ``meta`` ``(out, in/8)`` uint8 (the positions, :mod:`.format`'s layout) and ``scales``
``(out, in/group)``, in the stored column order, which the input gather (the checkpoint's input order, composed
with any runtime gather) maps to the linear's inputs.

- Calls of at most ``decode_max`` tokens (decode, memory-bound) run :func:`.triton_decode.matmul24_int4`, which
  dequantizes in registers: about a fifth of the dense bf16 bytes are read.
- Longer calls (prefill, compute-bound) dequantize the weight into a 2:4 dense tensor of the input's dtype for
  this call only and run cuSPARSELt's 2:4 product where it can (CUDA, float16 or bfloat16, its shape
  multiples), else a dense product; the weight is freed after the call.

Either way the result is what the dense dequantized weight gives (:meth:`dequantize`, the same rounding as
:meth:`permsparse.quant.QuantizedWeight.dequantize`). The tensors are non-persistent buffers: save the
checkpoint, not the deployed model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import cusparselt
from .format import decompress_nm, unpack_int4

__all__ = ["DECODE_MAX", "Int4Linear24"]

DECODE_MAX = 16  # the Triton kernel's tokens: decode steps and small batches of them


class Int4Linear24(nn.Module):
    """``y = x[..., gather] @ W.T + bias`` with ``W`` int4 codes times group scales, 2:4; see the module
    docstring."""

    def __init__(self, codes: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor, group: int,
                 bias: torch.Tensor | None = None, gather: torch.Tensor | None = None, decode_max: int = DECODE_MAX):
        super().__init__()
        from .triton_decode import int4_problem, matmul24_int4  # Triton is imported only where its kernel runs

        self.out_features, self.in_features = codes.shape[0], codes.shape[1] * 4
        problem = int4_problem(self.out_features, self.in_features, group)
        if problem:
            raise ValueError(problem)
        if tuple(meta.shape) != (self.out_features, self.in_features // 8) or meta.dtype != torch.uint8:
            raise ValueError(f"positions of shape {tuple(meta.shape)} ({meta.dtype}) for codes {tuple(codes.shape)}")
        if tuple(scales.shape) != (self.out_features, self.in_features // group):
            raise ValueError(f"scales of shape {tuple(scales.shape)} for {self.in_features} inputs in groups of {group}")
        self.group, self.decode_max = group, decode_max
        self._matmul = matmul24_int4
        for name, tensor in (("codes", codes), ("meta", meta), ("scales", scales), ("bias", bias),
                             ("gather", None if gather is None else gather.long())):
            self.register_buffer(name, tensor, persistent=False)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense ``(out, in)`` weight in the stored column order (2:4 there), in ``dtype``."""
        codes = decompress_nm(unpack_int4(self.codes, self.in_features // 2), self.meta, 2, 4)
        scales = self.scales.float().repeat_interleave(self.group, dim=1)
        return (codes.float() * scales).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.shape[0] <= self.decode_max:
            y = self._matmul(x, self.codes, self.meta, self.scales, self.group, bias, self.gather)
        else:
            if self.gather is not None:
                x = x.index_select(-1, self.gather)
            weight = self.dequantize(x.dtype)
            if x.is_cuda and not cusparselt.cusparselt_problem(self.out_features, self.in_features, x.dtype):
                y = cusparselt.matmul(x.contiguous(), cusparselt.compress(weight), bias)
            else:
                y = F.linear(x, weight, bias)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int4 group={self.group}, "
                f"Triton kernel up to {self.decode_max} tokens, input gather={self.gather is not None}, "
                f"bias={self.bias is not None}")
