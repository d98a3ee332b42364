"""A Triton 2:4 GEMM for few tokens that reads the compressed values and metadata (:mod:`.format`).

Decode is memory-bound: at 1–16 tokens a linear's time is the time to read its weight, and the compressed
format holds 56.25% of the dense bytes. Each program owns ``BN`` output features and walks the input
dimension in tiles of ``BK``: it loads ``BN x BK/2`` kept values and ``BN x BK/8`` metadata bytes, expands
them in registers into the dense ``BN x BK`` tile (a value lands on its group's slot, zeros elsewhere) and
multiplies it with the ``BM x BK`` tile of the input on the tensor cores, accumulating in float32. The
bias is added before the single store, and an input permutation (a runtime gather ``x[:, perm]``) is
folded into the input's loads, so neither costs a pass of its own. The output is contiguous
``(tokens, out)``. Any token count runs (in tiles of ``BM``); the policy measures where it wins.

A sibling kernel (:func:`matmul24_int4`) reads a 4-bit quantized 2:4 weight the way a compressed checkpoint
stores it (:mod:`permsparse.checkpoint.compressed`): two signed 4-bit codes a byte (a group's two kept entries,
the first in the low nibble), the same 2-bit positions, and one scale per output feature and run of ``G``
stored inputs. It dequantizes in registers – code times its group's scale, in float32, then rounded to the
input's dtype, exactly as :meth:`permsparse.quant.QuantizedWeight.dequantize` does – so a decode step reads
about a fifth of the dense bf16 bytes.

The launches are custom operators (``permsparse::matmul24``, ``permsparse::matmul24_int4``): ```torch.compile`` calls each as one opaque op and
CUDA graphs capture them. Imported only where the kernel is used (it needs ``triton``), once per process. Its
arithmetic runs on the CPU under Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is
imported, and while it runs), which the tests use.
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "blocks", "int4_problem", "matmul24", "matmul24_int4"]

# Whether the kernel runs under Triton's CPU interpreter: decided when the kernel is defined, below.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _input_tile(x_ptr, perm_ptr, rm, rk, M, K, stride_x, HAS_PERM: tl.constexpr):
    """The ``BM x BK`` tile of the input, its columns read through the input permutation when there is one."""
    if HAS_PERM:
        cols = tl.load(perm_ptr + rk, mask=rk < K, other=0)
    else:
        cols = rk
    return tl.load(x_ptr + rm[:, None] * stride_x + cols[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                   other=0.0)


@triton.jit
def _spread(first, second, meta_ptr, rn, k0, N, K, stride_meta, BN: tl.constexpr, BK: tl.constexpr):
    """The dense ``BN x BK`` tile of a 2:4 weight: each group's two kept values (``first``, ``second``, ``BN x
    BK/4``) on the slots its 4-bit position code names, zeros elsewhere."""
    rb = k0 // 8 + tl.arange(0, BK // 8)
    meta = tl.load(meta_ptr + rn[:, None] * stride_meta + rb[None, :],
                   mask=(rn[:, None] < N) & (rb[None, :] < K // 8), other=0).to(tl.int32)
    codes = tl.reshape(tl.join(meta & 15, meta >> 4), (BN, BK // 4))  # one 4-bit code per group
    slot = tl.arange(0, 4)[None, None, :]
    dense = tl.where(slot == (codes & 3)[:, :, None], first[:, :, None],
                     tl.where(slot == (codes >> 2)[:, :, None], second[:, :, None], 0.0))
    return tl.reshape(dense, (BN, BK))


@triton.jit
def _product(acc, x, weight, IEEE: tl.constexpr):
    """``acc + x @ weight.T`` in float32 (IEEE: no TF32 rounding, for float32 inputs)."""
    if IEEE:
        acc += tl.dot(x, tl.trans(weight), input_precision="ieee")
    else:
        acc += tl.dot(x, tl.trans(weight))
    return acc


@triton.jit
def _store(acc, bias_ptr, y_ptr, rn, rm, M, N, HAS_BIAS: tl.constexpr):
    """The output tile, bias added, written once in the output's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _sparse24_kernel(x_ptr, perm_ptr, values_ptr, meta_ptr, bias_ptr, y_ptr, M, N, K,
                     stride_x, stride_values, stride_meta,
                     HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    acc = tl.full((BM, BN), 0.0, tl.float32)  # tl.full, not tl.zeros (a @jit helper the interpreter may miss)
    for k0 in range(0, K, BK):
        x = _input_tile(x_ptr, perm_ptr, rm, k0 + tl.arange(0, BK), M, K, stride_x, HAS_PERM)
        rv = k0 // 2 + tl.arange(0, BK // 2)
        values = tl.load(values_ptr + rn[:, None] * stride_values + rv[None, :],
                         mask=(rn[:, None] < N) & (rv[None, :] < K // 2), other=0.0)
        first, second = tl.split(tl.reshape(values, (BN, BK // 4, 2)))
        weight = _spread(first, second, meta_ptr, rn, k0, N, K, stride_meta, BN, BK).to(x.dtype)
        acc = _product(acc, x, weight, IEEE)
    _store(acc, bias_ptr, y_ptr, rn, rm, M, N, HAS_BIAS)


def blocks(tokens: int, out_features: int) -> tuple[int, int, int, int]:
    """``(BM, BN, BK, num_warps)`` for a call: decode-shaped (one 16-row tile, long input tiles, narrow
    output tiles so that even a 1024-row linear spreads over many programs) up to 16 tokens, square tiles
    above."""
    if tokens <= 16:
        return 16, 32 if out_features >= 8192 else 16, 256, 4
    return 64, 64, 64, 4


@torch.library.custom_op("permsparse::matmul24", mutates_args=())
def matmul24(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor, bias: Optional[torch.Tensor] = None,
             perm: Optional[torch.Tensor] = None) -> torch.Tensor:  # typing.Optional: what every torch's schema reads
    """``x[:, perm] @ W.T + bias`` for ``x`` of shape ``(tokens, in)``, with ``W`` given as
    ``(values, meta)``; the result is contiguous ``(tokens, out)`` in ``x``'s dtype. A custom operator, so
    that ``torch.compile`` treats the launch as one opaque call (its shape from :func:`_matmul24_shape`)."""
    x = x.contiguous()
    tokens, width = x.shape
    out_features = values.shape[0]
    y = torch.empty((tokens, out_features), dtype=x.dtype, device=x.device)
    bm, bn, bk, warps = blocks(tokens, out_features)
    grid = (triton.cdiv(out_features, bn), triton.cdiv(tokens, bm))
    if INTERPRETED:
        # The interpreter passes an int argument as a one-element array, whose ``int()`` (the loop's bound)
        # numpy 2.4 refuses in Triton up to 3.6 ("only 0-dimensional arrays can be converted to Python
        # scalars"); a constant goes in as it is. Nothing is compiled there, so this costs nothing.
        width = tl.constexpr(width)
    _sparse24_kernel[grid](
        x, x if perm is None else perm, values, meta, x if bias is None else bias, y, tokens, out_features, width,
        x.stride(0), values.stride(0), meta.stride(0),
        HAS_PERM=perm is not None, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BM=bm, BN=bn, BK=bk, num_warps=warps)
    return y


@matmul24.register_fake
def _matmul24_shape(x, values, meta, bias=None, perm=None):
    return x.new_empty((x.shape[0], values.shape[0]))


@triton.jit
def _sparse24_int4_kernel(x_ptr, perm_ptr, codes_ptr, meta_ptr, scales_ptr, bias_ptr, y_ptr, M, N, K, G,
                          stride_x, stride_codes, stride_meta, stride_scales,
                          HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                          BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    acc = tl.full((BM, BN), 0.0, tl.float32)
    for k0 in range(0, K, BK):
        x = _input_tile(x_ptr, perm_ptr, rm, k0 + tl.arange(0, BK), M, K, stride_x, HAS_PERM)
        rg = k0 // 4 + tl.arange(0, BK // 4)  # the tile's groups of 4: one byte of two codes each
        inside = (rn[:, None] < N) & (rg[None, :] < K // 4)
        packed = tl.load(codes_ptr + rn[:, None] * stride_codes + rg[None, :], mask=inside, other=0).to(tl.int32)
        scale = tl.load(scales_ptr + rn[:, None] * stride_scales + (rg * 4 // G)[None, :], mask=inside,
                        other=0.0).to(tl.float32)
        first = (((packed & 15) ^ 8) - 8).to(tl.float32) * scale
        second = (((packed >> 4) ^ 8) - 8).to(tl.float32) * scale
        weight = _spread(first, second, meta_ptr, rn, k0, N, K, stride_meta, BN, BK).to(x.dtype)
        acc = _product(acc, x, weight, IEEE)
    _store(acc, bias_ptr, y_ptr, rn, rm, M, N, HAS_BIAS)


def int4_problem(out_features: int, in_features: int, group: int) -> str:
    """Why the int4 2:4 kernel cannot take a weight of this shape and quantization group ("" when it can)."""
    if in_features % 8:
        return f"in_features {in_features} is not a multiple of 8 (one metadata byte holds two groups of 4)"
    if group % 4 or in_features % group:
        return f"quantization group {group} is not a multiple of 4 dividing {in_features} inputs"
    return ""


@torch.library.custom_op("permsparse::matmul24_int4", mutates_args=())
def matmul24_int4(x: torch.Tensor, codes: torch.Tensor, meta: torch.Tensor, scales: torch.Tensor, group: int,
                  bias: Optional[torch.Tensor] = None, perm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x[:, perm] @ W.T + bias`` for ``x`` of shape ``(tokens, in)``, with ``W`` 2:4 given as its packed int4
    ``codes`` ``(out, in/4)`` uint8, its positions ``meta`` ``(out, in/8)`` uint8 and its ``scales``
    ``(out, in/group)`` (any float dtype); contiguous ``(tokens, out)`` in ``x``'s dtype."""
    x = x.contiguous()
    tokens, width = x.shape
    out_features = codes.shape[0]
    problem = int4_problem(out_features, width, group)
    if problem:
        raise ValueError(problem)
    y = torch.empty((tokens, out_features), dtype=x.dtype, device=x.device)
    bm, bn, bk, warps = blocks(tokens, out_features)
    grid = (triton.cdiv(out_features, bn), triton.cdiv(tokens, bm))
    if INTERPRETED:  # see matmul24
        width, group = tl.constexpr(width), tl.constexpr(group)
    _sparse24_int4_kernel[grid](
        x, x if perm is None else perm, codes, meta, scales, x if bias is None else bias, y, tokens, out_features,
        width, group, x.stride(0), codes.stride(0), meta.stride(0), scales.stride(0),
        HAS_PERM=perm is not None, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BM=bm, BN=bn, BK=bk, num_warps=warps)
    return y


@matmul24_int4.register_fake
def _matmul24_int4_shape(x, codes, meta, scales, group, bias=None, perm=None):
    return x.new_empty((x.shape[0], codes.shape[0]))
