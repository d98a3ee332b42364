"""Loading a permsparse checkpoint for inference: runtime input gathers and GPU 2:4 kernels.

:func:`load` reads a checkpoint written by :mod:`permsparse.checkpoint.save` with ``from_pretrained`` (a
causal LM with its head, an encoder as its bare model, :func:`permsparse.models.auto_class`) and

- re-attaches a runtime input gather ``x[..., p]`` (a forward pre-hook) to every linear exported with
  ``fallback="gather"``, whose weight is stored permuted (N:M in storage order); without it the model
  computes a different function. The permutation is a non-persistent buffer ``permsparse_gather`` of the
  linear, so it follows ``.to(device)`` and never enters ``state_dict``; ``save_pretrained`` of a loaded
  model therefore drops the gathers – re-export instead;
- with ``semi_structured=True`` converts linears that are 2:4 in storage order to
  ``torch.sparse`` semi-structured weights (NVIDIA GPUs of compute capability 8.0 or newer, float16 or
  bfloat16, shapes the kernels accept). **On a machine without a CUDA GPU this warns (RuntimeWarning) and
  leaves every weight dense**: the model still runs, and the reasons are reported. Linears that are N:M
  only through a permutation (the masked layout) are never converted: export ``folded`` (optionally with
  ``fallback="gather"``) to make them 2:4 in storage.

What was done is in ``model.permsparse_deploy``: ``{"gathers": [...], "semi_structured": {"converted":
[...], "not_converted": {name: reason}} or None}``.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from ..adapters import linear_weight
from ..discover import optional_submodule
from ..masks import as_permutation, is_nm
from ..models import auto_class
from .record import read_record

GATHER_BUFFER = "permsparse_gather"
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)

__all__ = [
    "attach_gathers", "remove_gathers", "load", "convert_semi_structured", "semi_structured_class",
    "semi_structured_unavailable",
]


def _gather_hook(module: nn.Module, args: tuple) -> tuple:
    perm = getattr(module, GATHER_BUFFER)
    return (args[0].index_select(-1, perm), *args[1:])


def attach_gathers(model: nn.Module, perms: dict[str, torch.Tensor]) -> list[str]:
    """Make each named linear gather its input as ``x[..., perm]`` before running; returns the names."""
    done = []
    for name, perm in perms.items():
        module = model.get_submodule(name)
        if hasattr(module, "_permsparse_gather_handle"):
            raise ValueError(f"{name} already has a runtime gather")
        perm = as_permutation(perm, linear_weight(module).shape[1], f"gather of {name}")
        module.register_buffer(GATHER_BUFFER, perm.to(linear_weight(module).device), persistent=False)
        module._permsparse_gather_handle = module.register_forward_pre_hook(_gather_hook)
        done.append(name)
    return done


def remove_gathers(model: nn.Module) -> list[str]:
    """Remove every runtime gather attached by :func:`attach_gathers`; returns the names."""
    removed = []
    for name, module in model.named_modules():
        handle = module.__dict__.pop("_permsparse_gather_handle", None)
        if handle is not None:
            handle.remove()
            delattr(module, GATHER_BUFFER)
            removed.append(name)
    return removed


def semi_structured_unavailable(device: torch.device | str | None = None) -> str:
    """Why GPU semi-structured (2:4) kernels cannot run here, or "" when they can."""
    if not torch.cuda.is_available():
        return "semi-structured 2:4 sparsity needs a CUDA GPU (compute capability >= 8.0); none is available"
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda":
        return f"semi-structured 2:4 sparsity needs the model on a CUDA device, not {device}; load with device='cuda'"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"semi-structured 2:4 sparsity needs compute capability >= 8.0; this GPU has {major}.{minor}"
    return ""


def semi_structured_class(name: str = "auto"):
    """The semi-structured tensor class for ``name`` ("auto": cuSPARSELt when available, else CUTLASS)."""
    if name == "auto":
        available = getattr(getattr(torch.backends, "cusparselt", None), "is_available", lambda: False)()
        name = "cusparselt" if available else "cutlass"
    if name == "cusparselt":
        return torch.sparse.SparseSemiStructuredTensorCUSPARSELT
    if name == "cutlass":
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    raise ValueError(f"unknown semi-structured backend {name!r}; choose auto, cusparselt or cutlass")


def _shape_problem(cls, weight: torch.Tensor) -> str:
    constraints = getattr(cls, "_DTYPE_SHAPE_CONSTRAINTS", {}).get(weight.dtype)
    if constraints is None:
        return ""  # unknown to this torch version: let the conversion decide
    rows, cols = constraints.sparse_min_rows, constraints.sparse_min_cols
    out, inp = weight.shape
    if out < rows or out % rows or inp < cols or inp % cols:
        return f"shape {out}x{inp}: both dimensions must be multiples of ({rows}, {cols}) for {cls.BACKEND}"
    return ""


@torch.no_grad()
def convert_semi_structured(model: nn.Module, names: list[str], backend: str = "auto") -> dict:
    """Replace the weights of the named linears (2:4 in storage order) by semi-structured sparse tensors.

    Returns ``{"backend": ..., "converted": [...], "not_converted": {name: reason}}``. Without a usable GPU
    nothing is converted and a RuntimeWarning says why (the model keeps running densely).
    """
    result = {"backend": None, "converted": [], "not_converted": {}}
    if not names:
        return result
    packed = [name for name in names if optional_submodule(model, name) is None]  # split experts' linears
    names = [name for name in names if name not in packed]
    result["not_converted"] = dict.fromkeys(packed, "a packed expert weight (3-D): no semi-structured kernel")
    if not names:
        return result
    first = linear_weight(model.get_submodule(names[0]))
    unavailable = semi_structured_unavailable(first.device if torch.cuda.is_available() else None)
    if unavailable:
        warnings.warn(f"{unavailable}; all {len(names)} linears stay dense", RuntimeWarning, stacklevel=3)
        result["not_converted"].update(dict.fromkeys(names, unavailable))
        return result
    cls = semi_structured_class(backend)
    result["backend"] = cls.BACKEND
    for name in names:
        module = model.get_submodule(name)
        weight = getattr(module, "weight", None)
        if not isinstance(module, nn.Linear):
            reason = f"{type(module).__name__} is not an nn.Linear"
        elif not weight.is_cuda:
            reason = f"weight on {weight.device}, not a CUDA device"
        elif weight.dtype not in SEMI_STRUCTURED_DTYPES:
            reason = f"dtype {str(weight.dtype).removeprefix('torch.')}: needs float16 or bfloat16 (load with dtype=...)"
        else:
            reason = _shape_problem(cls, weight) or ("" if is_nm(weight, 2, 4) else "not 2:4 in storage order")
        if not reason:
            try:
                sparse = cls.from_dense(weight.detach().contiguous())
            except (RuntimeError, NotImplementedError) as err:
                reason = f"conversion failed: {type(err).__name__}: {str(err).splitlines()[0]}"
            else:
                module.weight = nn.Parameter(sparse, requires_grad=False)
                result["converted"].append(name)
                continue
        result["not_converted"][name] = reason
    return result


def load(
    folder: str | Path, device: str | torch.device = "cpu", semi_structured: bool = False,
    dtype: torch.dtype | str = "auto", backend: str = "auto",
) -> nn.Module:
    """Load a permsparse checkpoint for inference, with its runtime gathers; see the module docstring.

    ``dtype`` defaults to the stored one; 2:4 GPU kernels need ``torch.float16`` or ``torch.bfloat16``.
    ``semi_structured=True`` converts the linears that are 2:4 in storage order (``folded`` exports, and
    every layer of a ``fallback="gather"`` export); on a machine without a CUDA GPU it warns and skips.
    """
    from transformers import AutoConfig

    folder = Path(folder)
    record = read_record(folder)
    model = auto_class(AutoConfig.from_pretrained(folder)).from_pretrained(folder, dtype=dtype)
    model.eval()
    gathers = {name: torch.as_tensor(entry.perm) for name, entry in record.layouts.items() if entry.layout == "gather"}
    attach_gathers(model, gathers)
    model.to(device)
    info = {"folder": str(folder), "format": record.export, "gathers": sorted(gathers), "semi_structured": None}
    if semi_structured:
        if record.config.nm != (2, 4):
            reason = f"pattern {record.config.pattern}: GPU semi-structured kernels need 2:4"
            info["semi_structured"] = {"backend": None, "converted": [],
                                       "not_converted": dict.fromkeys(record.layouts, reason)}
        else:
            storage = [name for name, entry in record.layouts.items() if entry.layout in ("nm", "gather")]
            info["semi_structured"] = convert_semi_structured(model, storage, backend)
            for name, entry in record.layouts.items():
                if entry.layout == "masked":
                    info["semi_structured"]["not_converted"][name] = (
                        "2:4 only through its permutation (masked layout); export folded to make it 2:4 in storage")
    model.permsparse_deploy = info
    return model
