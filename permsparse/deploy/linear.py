"""The deployed 2:4 linear: compressed weight only, one kernel per call chosen by the token count.

:class:`Linear24` replaces an ``nn.Linear`` (or GPT-2's ``Conv1D``) whose weight is 2:4 in storage order. It
holds the weight in one of three storages (:data:`STORAGES`), never a dense copy:

- ``cusparselt``: cuSPARSELt's compressed tensor; every call runs ``_cslt_sparse_mm`` (:mod:`.cusparselt`);
- ``triton``: the kept values and 2-bit positions of :mod:`.format`; every call runs the Triton kernel
  (:mod:`.triton_decode`);
- ``cusparselt+triton``: cuSPARSELt's compressed tensor plus the 2-bit positions; calls of at most
  ``decode_max`` tokens run the Triton kernel on cuSPARSELt's kept values (where cuSPARSELt stores them
  row by row, checked at conversion), longer ones run cuSPARSELt.

Which storage, the token threshold and cuSPARSELt's algorithm are decided once, at conversion
(:mod:`.policy`, :mod:`.convert`); a call does a shape check and one kernel (plus the input gather of an
unfolded permutation, which the Triton kernel folds into its loads). There is no ``.item()`` and no host
synchronisation, so the module runs inside CUDA graphs and under ``torch.compile``. The outputs are
contiguous ``(..., out)``, as ``F.linear`` gives. The compressed tensors are non-persistent buffers: a
deployed model is for inference as it is (``.to(dtype)`` would reinterpret cuSPARSELt's packed metadata;
``state_dict`` holds none of it – save the checkpoint, not the deployed model).
"""
from __future__ import annotations

import sys

import torch
from torch import nn

from ..discover import is_linear, linear_weight
from . import cusparselt
from .format import compress as compress_values
from .gathers import GATHER

__all__ = ["STORAGES", "Linear24", "weight_bytes"]

STORAGES = ("cusparselt", "triton", "cusparselt+triton")
ALL_TOKENS = sys.maxsize  # decode_max of the triton storage: every call runs the Triton kernel


class Linear24(nn.Module):
    """``y = x[..., gather] @ W.T + bias`` with ``W`` 2:4 in storage order, held compressed; see the module
    docstring."""

    def __init__(self, in_features: int, out_features: int, storage: str, *, packed: torch.Tensor | None = None,
                 meta: torch.Tensor | None = None, values: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, gather: torch.Tensor | None = None, decode_max: int = 0,
                 alg_id: int = 0):
        super().__init__()
        if storage not in STORAGES:
            raise ValueError(f"unknown 2:4 storage {storage!r}; choose one of {', '.join(STORAGES)}")
        needs = {"cusparselt": ("packed",), "triton": ("values", "meta"), "cusparselt+triton": ("packed", "meta")}
        given = {"packed": packed, "values": values, "meta": meta}
        missing = [name for name in needs[storage] if given[name] is None]
        extra = [name for name, tensor in given.items() if tensor is not None and name not in needs[storage]]
        if missing or extra:
            raise ValueError(f"the {storage} storage holds {', '.join(needs[storage])}; "
                             f"{'missing ' + ', '.join(missing) if missing else 'given also ' + ', '.join(extra)}")
        self.in_features, self.out_features, self.storage = in_features, out_features, storage
        self.decode_max = ALL_TOKENS if storage == "triton" else (decode_max if storage == "cusparselt+triton" else 0)
        self.alg_id = alg_id
        if storage != "cusparselt":  # Triton is imported only where its kernel runs
            from .triton_decode import matmul24

            self._matmul24 = matmul24
        for name, tensor in (*given.items(), ("bias", bias), (GATHER, gather)):
            self.register_buffer(name, tensor, persistent=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, module: nn.Module, storage: str, decode_max: int = 0, alg_id: int = 0) -> "Linear24":
        """The 2:4 linear computing what ``module`` computes (its runtime gather included, which this
        module then applies itself). ValueError when the weight is not 2:4 in storage order, or when
        cuSPARSELt's kept values are not stored row by row (``cusparselt+triton``)."""
        if not is_linear(module):
            raise ValueError(f"{type(module).__name__} is not a linear layer")
        bias = getattr(module, "bias", None)
        return cls.from_weight(linear_weight(module).detach(), storage, bias=bias, gather=getattr(module, GATHER, None),
                               decode_max=decode_max, alg_id=alg_id)

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, storage: str, *, bias: torch.Tensor | None = None,
                    gather: torch.Tensor | None = None, decode_max: int = 0, alg_id: int = 0) -> "Linear24":
        """The 2:4 linear ``x[..., gather] @ weight.T + bias`` for a dense ``(out, in)`` weight that is 2:4 in
        its column order (a compressed checkpoint's linear expanded in its storage order, with its input order
        as ``gather``); ValueError as :meth:`from_linear`."""
        weight = weight.contiguous()
        out_features, in_features = weight.shape
        values, meta = compress_values(weight)  # also refuses a weight that is not 2:4
        packed = None
        if storage != "triton":
            packed = cusparselt.compress(weight)
            if storage == "cusparselt+triton" and not torch.equal(
                    cusparselt.kept_values(packed, out_features, in_features), values):
                raise ValueError("cuSPARSELt does not store the kept values row by row here: the Triton kernel "
                                 "cannot share them (use the cusparselt or triton storage)")
            values = None
        if storage == "cusparselt":
            meta = None
        return cls(in_features, out_features, storage, packed=packed, meta=meta, values=values,
                   bias=None if bias is None else bias.detach().to(weight.dtype), gather=gather,
                   decode_max=decode_max, alg_id=alg_id)

    def _values(self) -> torch.Tensor:
        if self.values is not None:
            return self.values
        return cusparselt.kept_values(self.packed, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        gather = getattr(self, GATHER)
        if x.shape[0] <= self.decode_max:
            y = self._matmul24(x, self._values(), self.meta, self.bias, gather)
        else:
            if gather is not None:
                x = x.index_select(-1, gather)
            y = cusparselt.matmul(x, self.packed, self.bias, self.alg_id)
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        decode = {0: "", ALL_TOKENS: ", every call on the Triton kernel"}.get(
            self.decode_max, f", Triton kernel up to {self.decode_max} tokens")
        gather = ", input gather" if getattr(self, GATHER) is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, storage={self.storage}{decode}"
                f"{gather}, bias={self.bias is not None}")


def weight_bytes(module: nn.Module) -> int:
    """Bytes of a linear's weight as it is held: the compressed tensors of a :class:`Linear24`, the dense
    weight of a plain linear (each storage counted once)."""
    if isinstance(module, Linear24):
        tensors = [t for t in (module.packed, module.values, module.meta) if t is not None]
    else:
        tensors = [linear_weight(module)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())
