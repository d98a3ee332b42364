"""Loading a permsparse checkpoint for inference: runtime input gathers and GPU 2:4 kernels.

:func:`load` reads a checkpoint written by :mod:`permsparse.checkpoint.save` with ``from_pretrained`` (a
causal LM with its head, an encoder as its bare model, :func:`permsparse.models.loading.auto_class`) and

- re-attaches a runtime input gather ``x[..., p]`` to every linear exported with ``fallback="gather"``,
  whose weight is stored permuted (N:M in storage order); without it the model computes a different
  function. Where all the linears reading one norm's output share one permutation (shared binding), the
  norm emits the gathered output once instead (:func:`permsparse.deploy.gathers.fold_gathers`; the
  same values). The permutations are non-persistent buffers ``permsparse_gather``, so they follow
  ``.to(device)`` and never enter ``state_dict``; ``save_pretrained`` of a loaded model therefore drops
  the gathers – re-export instead;
- with ``semi_structured=True`` converts the linears that are 2:4 in storage order to
  :class:`permsparse.deploy.Linear24` (NVIDIA GPUs of compute capability 8.0 or newer, float16 or
  bfloat16) where the conversion policy finds 2:4 faster for the expected ``workload`` than dense; the
  others stay dense, with the reason (:func:`permsparse.deploy.deploy`). **On a machine without a CUDA GPU
  this warns (RuntimeWarning) and leaves every weight dense**: the model still runs, and the reasons are
  reported. Linears that are N:M only through a permutation (the masked layout) are never converted:
  export ``folded`` (optionally with ``fallback="gather"``) to make them 2:4 in storage.

What was done is in ``model.permsparse_deploy``: ``{"gathers": [...], "gather_folds": {...},
"semi_structured": {"converted": [...], "not_converted": {name: reason}, "storages": ..., "predicted_speedup":
..., "bytes": ...} or None}``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..deploy.convert import BACKENDS, deploy, gpu_problem
from ..deploy.gathers import GATHER, attach_gathers, fold_gathers, remove_gathers
from ..deploy.policy import CostKey, read_costs
from ..models.loading import auto_class, read_config
from ..serial import to_dict
from .digest import check_weight_files
from .record import read_record

GATHER_BUFFER = GATHER

__all__ = ["attach_gathers", "remove_gathers", "load", "semi_structured_unavailable"]

semi_structured_unavailable = gpu_problem


def load(
    folder: str | Path, device: str | torch.device = "cpu", semi_structured: bool = False,
    dtype: torch.dtype | str = "auto", backend: str = "auto", workload: dict[int, float] | None = None,
    costs: str | Path | dict[CostKey, float] | None = None,
) -> nn.Module:
    """Load a permsparse checkpoint for inference, with its runtime gathers; see the module docstring.

    ``dtype`` defaults to the stored one; 2:4 GPU kernels need ``torch.float16`` or ``torch.bfloat16``.
    ``semi_structured=True`` converts the linears that are 2:4 in storage order (``folded`` exports, and
    every layer of a ``fallback="gather"`` export) where 2:4 is faster; on a machine without a CUDA GPU it
    warns and skips. ``backend``: ``auto`` (cuSPARSELt and the Triton kernel, as the policy chooses),
    ``cusparselt`` or ``triton`` alone. ``workload``: calls per token count to expect (default: a
    2048-token prompt and 128 generated tokens). ``costs``: a cost table (or the JSON file ``permsparse
    speed`` writes) that spares timing the linears at load.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown 2:4 backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    folder = Path(folder)
    record = read_record(folder)
    check_weight_files(folder)
    model = auto_class(read_config(folder)).from_pretrained(folder, dtype=dtype, use_safetensors=True)
    model.eval()
    gathers = {name: torch.as_tensor(entry.perm) for name, entry in record.layouts.items() if entry.layout == "gather"}
    attach_gathers(model, gathers)
    model.to(device)
    folds = fold_gathers(model)
    info = {"folder": str(folder), "format": record.export, "gathers": sorted(gathers),
            "gather_folds": to_dict(folds), "semi_structured": None}
    if semi_structured:
        if record.config.nm != (2, 4):
            reason = f"pattern {record.config.pattern}: GPU semi-structured kernels need 2:4"
            info["semi_structured"] = {"converted": [], "not_converted": dict.fromkeys(record.layouts, reason)}
        else:
            table = read_costs(costs) if isinstance(costs, (str, Path)) else costs
            storage = [name for name, entry in record.layouts.items() if entry.layout in ("nm", "gather")]
            info["semi_structured"] = deploy(model, storage, workload=workload, costs=table, backend=backend)
            for name, entry in record.layouts.items():
                if entry.layout == "masked":
                    info["semi_structured"]["not_converted"][name] = (
                        "2:4 only through its permutation (masked layout); export folded to make it 2:4 in storage")
    model.permsparse_deploy = info
    return model
