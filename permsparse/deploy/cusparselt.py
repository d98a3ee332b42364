"""cuSPARSELt's 2:4 product, called directly: the result in the layout the next operation reads, no copy.

``torch._cslt_sparse_mm(packed, B)`` computes ``W @ B`` with ``W`` compressed by ``torch._cslt_compress``.
Given ``B = x.T`` (a transposed view of the contiguous ``(tokens, in)`` input, which cuSPARSELt reads as a
column-major operand) and ``transpose_result=True`` it writes ``(W @ x.T).T = x @ W.T`` as a contiguous
``(tokens, out)`` tensor – what ``F.linear`` returns – with the bias added in the same kernel. torch's
semi-structured tensor class, by default, returns the transposed, non-contiguous result instead, so
attention then runs on strided q/k/v. The algorithm id is chosen once, when the weight is converted.

Everything here needs a CUDA GPU with cuSPARSELt; :func:`cusparselt_problem` says why it cannot run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["DTYPES", "compress", "cusparselt_available", "cusparselt_problem", "kept_values", "matmul", "search_alg_id"]

# Smallest multiple of rows/columns of the compressed operand, and of the dense operand's token count, by
# dtype (torch's SparseSemiStructuredTensorCUSPARSELT._DTYPE_SHAPE_CONSTRAINTS).
DTYPES = {torch.float16: (16, 8), torch.bfloat16: (16, 8), torch.float8_e4m3fn: (32, 16)}


def cusparselt_available() -> bool:
    return bool(getattr(getattr(torch.backends, "cusparselt", None), "is_available", lambda: False)())


def cusparselt_problem(out: int, width: int, dtype: torch.dtype) -> str:
    """Why a 2:4 weight of shape ``(out, width)`` and ``dtype`` cannot run through cuSPARSELt here ("" when
    it can; the device is the caller's to check)."""
    if not cusparselt_available():
        return f"torch {torch.__version__} has no cuSPARSELt"
    if dtype not in DTYPES:
        return f"cuSPARSELt 2:4 takes float16, bfloat16 or float8_e4m3fn, not {str(dtype).removeprefix('torch.')}"
    multiple = DTYPES[dtype][0]
    if out % multiple or width % multiple:
        return f"shape {out}x{width}: cuSPARSELt needs both dimensions to be multiples of {multiple}"
    return ""


def compress(weight: torch.Tensor) -> torch.Tensor:
    """The cuSPARSELt-compressed weight (kept values, then metadata), viewed as ``(out, -1)``: its row count
    is what ``_cslt_sparse_mm`` reports as the output width when traced."""
    packed = torch._cslt_compress(weight.contiguous())
    return packed.view(weight.shape[0], -1) if packed.numel() % weight.shape[0] == 0 else packed


def kept_values(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The first ``out * in / 2`` elements of a compressed weight as ``(out, in/2)``: cuSPARSELt's kept
    values, when they are stored row by row (checked against :func:`permsparse.deploy.format.compress`
    before they are read as such)."""
    return packed.reshape(-1)[: out_features * in_features // 2].view(out_features, in_features // 2)


def matmul(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None, alg_id: int = 0,
           alpha: torch.Tensor | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` of shape ``(tokens, in)``, contiguous ``(tokens, out)``. A token count
    that is not a multiple of the kernel's is padded with zero rows (fixed per shape, so it is captured
    with the rest). ``alpha`` scales output features (float32, ``(out,)``); ``out_dtype`` is for 8-bit
    inputs."""
    tokens = x.shape[0]
    pad = -tokens % DTYPES[x.dtype][1]
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    y = torch._cslt_sparse_mm(packed, x.t(), bias=bias, alpha=alpha, out_dtype=out_dtype, transpose_result=True,
                              alg_id=alg_id)
    return y[:tokens] if pad else y


def search_alg_id(packed: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[int, str]:
    """cuSPARSELt's fastest algorithm for this weight at ``x``'s token count, searched once (``(0, why)``
    where the search is unavailable or its choice fails)."""
    search = getattr(torch, "_cslt_sparse_mm_search", None)
    if search is None:
        return 0, f"torch {torch.__version__} has no _cslt_sparse_mm_search"
    pad = -x.shape[0] % DTYPES[x.dtype][1]
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    try:
        alg_id = int(search(packed, x.t(), bias=bias, transpose_result=True))
        matmul(x, packed, bias, alg_id)
    except (RuntimeError, TypeError) as err:
        return 0, f"algorithm search failed: {type(err).__name__}: {str(err).splitlines()[0]}"
    return alg_id, ""
