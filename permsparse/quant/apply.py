"""Quantizing a model's pruned linears: which can be, each one quantized through its permutation, and the
model then running the dequantized weights (what is deployed), each linear carrying its record."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from ..discover.adapters import linear_weight
from ..config import Quantization
from ..report import QuantRecord
from . import ATTRIBUTE, QuantizedWeight, attach
from .gptq import gptq
from .rtn import rtn


def indivisible(quant: Quantization, widths: dict[str, int], strict: bool) -> list[str]:
    """Linears (by name, of ``widths`` = their input widths) whose width the quantization group does not divide:
    they stay unquantized, with a warning naming them; with ``strict`` it is an error instead."""
    if not quant.enabled:
        return []
    bad = [f"{name} (in_features={width}, --quant-group {quant.group_for(width)})"
           for name, width in widths.items() if width % quant.group_for(width)]
    if bad:
        message = f"{quant.kind} groups that do not divide the input width: {', '.join(bad)}"
        if strict:
            raise ValueError(message)
        warnings.warn(f"keeping unquantized, {message}", stacklevel=3)
    return [entry.split(" ")[0] for entry in bad]


def quantize_weight(weight: torch.Tensor, keep: torch.Tensor, hessian: torch.Tensor | None, quant: Quantization,
                    input_order: torch.Tensor | None) -> QuantizedWeight:
    """``weight`` (pruned, original order) quantized as ``quant`` says, groups in ``input_order``."""
    group = quant.group_for(weight.shape[1])
    if quant.method == "rtn":
        return rtn(weight, quant.kind, group, input_order)
    if hessian is None:
        raise ValueError("GPTQ needs the layer's input Gram matrix; none was collected")
    return gptq(weight, keep, hessian, quant.kind, group, input_order)


def relative_error(weight: torch.Tensor, deployed: torch.Tensor, hessian: torch.Tensor) -> float:
    """``sum_r d_r H d_r^T / sum_r w_r H w_r^T`` for ``d = weight - deployed``."""
    w, h = weight.double(), hessian.double()
    d = w - deployed.double()
    return float(((d @ h) * d).sum() / ((w @ h) * w).sum().clamp_min(1e-30))


@torch.no_grad()
def quantize_linears(model: nn.Module, masks: dict[str, torch.Tensor], perms: dict[str, torch.Tensor | None],
                     grams: dict[str, torch.Tensor], quant: Quantization, skip: list[str]) -> list[QuantRecord]:
    """Quantize every linear of ``masks`` (full names in ``model``, their keep-masks) but those in ``skip``.

    Each is quantized in the storage order ``perms[name]`` (its site's permutation; None or the identity:
    unpermuted) on its Gram matrix ``grams[name]`` (GPTQ; also the recorded errors), its weight replaced by
    the dequantized codes in the model's dtype, and its record attached to the module (on the CPU).
    """
    records = []
    for name, keep in masks.items():
        if name in skip:
            continue
        module = model.get_submodule(name)
        weight = linear_weight(module)
        perm = perms.get(name)
        if perm is not None and torch.equal(perm.cpu(), torch.arange(perm.numel())):
            perm = None
        perm = None if perm is None else perm.to(weight.device)
        gram = grams.get(name)
        quantized = quantize_weight(weight, keep.to(weight.device), gram, quant, perm)
        deployed = quantized.weight(torch.float32)
        errors = (None, None)
        if gram is not None:
            reference = rtn(weight, quant.kind, quantized.group, perm).weight(torch.float32)
            errors = relative_error(weight, deployed, gram), relative_error(weight, reference, gram)
        weight.copy_(deployed.to(weight.dtype))
        attach(module, QuantizedWeight(quantized.kind, quantized.codes.cpu(), quantized.scales.cpu(), quantized.group,
                                       None if perm is None else perm.cpu()))
        records.append(QuantRecord(name, quant.kind, quantized.group, quant.method, *errors))
    return records


def saved_quantized(model: nn.Module, names) -> dict[str, dict]:
    """The quantized records of the named linears, as progress stores them (fp8 codes as their bytes)."""
    out = {}
    for name in names:
        record = getattr(model.get_submodule(name), ATTRIBUTE, None)
        if record is not None:
            codes = record.codes.view(torch.int8) if record.kind == "fp8" else record.codes
            out[name] = {"kind": record.kind, "codes": codes, "scales": record.scales, "group": record.group,
                         "input_order": record.input_order}
    return out


def restore_quantized(model: nn.Module, saved: dict[str, dict]) -> None:
    """Re-attach the quantized records progress stored (:func:`saved_quantized`)."""
    for name, entry in saved.items():
        codes = entry["codes"].view(torch.float8_e4m3fn) if entry["kind"] == "fp8" else entry["codes"]
        attach(model.get_submodule(name), QuantizedWeight(entry["kind"], codes, entry["scales"], entry["group"],
                                                          entry["input_order"]))
