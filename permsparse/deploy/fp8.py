"""FP8 x 2:4 through cuSPARSELt on Hopper: one more measured candidate, with its error stated.

Weights and activations in ``float8_e4m3fn``. The weight is scaled per output feature
(``s_w = max |W[o]| / 448``), quantised and compressed once; zeros stay zeros, so it stays 2:4. The input
is scaled per token (``s_x = max |x[t]| / 448``) and quantised in the call. cuSPARSELt multiplies the two
e4m3 operands, scales each output feature by ``s_w`` (its alpha vector) and writes the model's dtype; the
per-token ``s_x`` and the bias are applied after. This changes the model's function (e4m3 keeps 3
mantissa bits): :mod:`.speed` reports its logit error against the dense model beside its time.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..discover import linear_weight
from . import cusparselt
from .gathers import GATHER

__all__ = ["E4M3_MAX", "Fp8Linear24", "fp8_problem"]

E4M3_MAX = 448.0


def fp8_problem() -> str:
    """Why FP8 x 2:4 cannot run here ("" when it may: the conversion's first product decides)."""
    if not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no float8_e4m3fn"
    if not cusparselt.cusparselt_available():
        return f"torch {torch.__version__} has no cuSPARSELt"
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        return "FP8 x 2:4 needs a GPU of compute capability >= 8.9 (Ada, Hopper)"
    return ""


class Fp8Linear24(nn.Module):
    """``x[..., gather] @ W.T + bias`` with ``W`` 2:4 and both operands in e4m3; see the module docstring."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                 gather: torch.Tensor | None, in_features: int, out_features: int, transposed: bool):
        super().__init__()
        self.in_features, self.out_features, self.transposed = in_features, out_features, transposed
        for name, tensor in (("packed", packed), ("scale", scale), ("bias", bias), (GATHER, gather)):
            self.register_buffer(name, tensor, persistent=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, module: nn.Module) -> "Fp8Linear24":
        """The FP8 version of a 2:4 linear (its gather kept); RuntimeError when cuSPARSELt refuses it."""
        weight = linear_weight(module).detach()
        out_features, in_features = weight.shape
        problem = cusparselt.cusparselt_problem(out_features, in_features, torch.float8_e4m3fn)
        if problem:
            raise ValueError(problem)
        scale = weight.float().abs().amax(1).clamp_min(1e-12) / E4M3_MAX
        quantised = (weight.float() / scale[:, None]).to(torch.float8_e4m3fn)
        packed = cusparselt.compress(quantised)
        bias = getattr(module, "bias", None)
        bias = None if bias is None else bias.detach()
        gather = getattr(module, GATHER, None)
        probe = torch.zeros(16, in_features, device=weight.device, dtype=weight.dtype)
        for transposed in (True, False):  # the layout cuSPARSELt's e4m3 kernels write
            linear = cls(packed, scale, bias, gather, in_features, out_features, transposed)
            try:
                linear(probe)
            except RuntimeError as err:
                failure = err
                continue
            return linear
        raise RuntimeError(f"cuSPARSELt refuses e4m3 x e4m3: {str(failure).splitlines()[0]}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, dtype = x.shape[:-1], x.dtype
        x = x.reshape(-1, self.in_features)
        gather = getattr(self, GATHER)
        if gather is not None:
            x = x.index_select(-1, gather)
        tokens = x.shape[0]
        pad = -tokens % cusparselt.DTYPES[torch.float8_e4m3fn][1]
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        scale = x.abs().amax(1, keepdim=True).float().clamp_min(1e-12) / E4M3_MAX
        quantised = (x.float() / scale).to(torch.float8_e4m3fn)
        y = torch._cslt_sparse_mm(self.packed, quantised.t(), alpha=self.scale, out_dtype=dtype,
                                  transpose_result=self.transposed)
        y = (y if self.transposed else y.t()) * scale.to(dtype)
        if self.bias is not None:
            y = y + self.bias
        return y[:tokens].reshape(*lead, self.out_features)
