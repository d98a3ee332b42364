"""Runtime input gathers, and their fold into the norms: one gather per norm output, not one per reader.

A ``fallback="gather"`` export stores a linear permuted; its input must be gathered, ``x[..., p]``, before
it runs (:func:`attach_gathers`: a forward pre-hook, the permutation a non-persistent buffer
``permsparse_gather`` of the linear, so it follows ``.to(device)`` and never enters ``state_dict``).

Under shared binding every linear reading one norm's output (LLaMA's q/k/v after ``input_layernorm``,
gate/up after ``post_attention_layernorm``) has the same ``p``: the norm can emit the gathered output once,
``norm(x)[..., p]``, and its readers run without a gather of their own – exactly the same values, a third
(a half) of the gathers; under ``torch.compile`` the gather fuses into the norm's kernel. Readers of one
norm with different permutations (per-linear binding), or a norm whose output is also read ungathered,
keep one gather per reader (the Triton kernel of :mod:`.linear` folds it into its loads).

Which linears read which norm is found on one forward pass (the adapter's ``block_norms``; a reader reads
the very tensor the norm returned), and the folded model must give bit-identical outputs on that pass,
else every fold is undone. Nothing here names a model family.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..discover.adapters import adapter_for
from ..discover import (NotUnderstood, is_linear, linear_weight, optional_submodule, primary_output, probe_input,
                        run_model)
from ..sparsity.masks import as_permutation

__all__ = ["GATHER", "GatherFolds", "attach_gathers", "fold_gathers", "gathered_linears", "gathering_modules",
           "remove_gathers"]

GATHER = "permsparse_gather"  # the buffer holding a gather's permutation, on a linear or a norm
HANDLE = "_permsparse_gather_handle"  # the hook that applies it


@dataclass
class GatherFolds:
    """What :func:`fold_gathers` did: the norms that emit a gather (with the readers it replaced), and why
    each other gathered linear keeps its own."""

    norms: dict[str, list[str]] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)

    def gathers(self) -> int:
        """Gathers per forward pass: one per folded norm, one per linear that kept its own."""
        return len(self.norms) + len(self.kept)


def _gather_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].index_select(-1, getattr(module, GATHER)), *args[1:])


def _emit_gather(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return output.index_select(-1, getattr(module, GATHER))


def attach_gathers(model: nn.Module, perms: dict[str, torch.Tensor]) -> list[str]:
    """Make each named linear gather its input as ``x[..., perm]`` before running; returns the names."""
    done = []
    for name, perm in perms.items():
        module = model.get_submodule(name)
        if HANDLE in module.__dict__:
            raise ValueError(f"{name} already has a runtime gather")
        weight = linear_weight(module)
        perm = as_permutation(perm, weight.shape[1], f"gather of {name}")
        module.register_buffer(GATHER, perm.to(weight.device), persistent=False)
        module.__dict__[HANDLE] = module.register_forward_pre_hook(_gather_input)
        done.append(name)
    return done


def remove_gathers(model: nn.Module) -> list[str]:
    """Remove every runtime gather (of a linear, or folded into a norm); returns the module names."""
    removed = []
    for name, module in model.named_modules():
        handle = module.__dict__.pop(HANDLE, None)
        if handle is not None:
            handle.remove()
            delattr(module, GATHER)
            removed.append(name)
    return removed


def gathering_modules(model: nn.Module) -> list[str]:
    """Names of the modules that apply a runtime gather by a hook (linears, and norms after a fold)."""
    return [name for name, module in model.named_modules() if HANDLE in module.__dict__]


def gathered_linears(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every linear with a runtime gather (a forward pre-hook), by name, with its permutation."""
    return {name: getattr(module, GATHER) for name, module in model.named_modules()
            if is_linear(module) and HANDLE in module.__dict__}


def _readers(model: nn.Module, norms: dict[str, nn.Module]) -> tuple[dict[str, list[str]], torch.Tensor]:
    """The linears reading each norm's output on one forward pass, and the model's output on it."""
    outputs: dict[str, torch.Tensor] = {}
    inputs: dict[str, torch.Tensor] = {}
    handles = []
    for name, norm in norms.items():
        handles.append(norm.register_forward_hook(lambda m, a, out, name=name: outputs.__setitem__(name, out)))
    for name, module in model.named_modules():
        if is_linear(module):  # before any gather hook, to see the input the linear is given
            handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: inputs.__setitem__(name, args[0]), prepend=True))
    try:
        with torch.no_grad():
            reference = primary_output(run_model(model, probe_input(model)))
    finally:
        for handle in handles:
            handle.remove()
    readers = {norm: [name for name, x in inputs.items() if x is out] for norm, out in outputs.items()}
    return readers, reference


@torch.no_grad()
def fold_gathers(model: nn.Module) -> GatherFolds:
    """Move the runtime gathers of each norm's readers into the norm where they share one permutation;
    see the module docstring. The model computes exactly what it computed before."""
    gathered = gathered_linears(model)
    result = GatherFolds()
    if not gathered:
        return result
    remove_gathers(model)  # discovery sees the model without them (its result is kept for the architecture)
    try:
        adapter = adapter_for(model)
    except NotUnderstood as err:
        result.kept = dict.fromkeys(gathered, f"the model's structure is not understood: {err}")
        return result
    finally:
        attach_gathers(model, gathered)
    norms = {}
    for i in range(len(adapter.blocks(model))):
        for rel in adapter.kind(i).block_norms:
            module = optional_submodule(model, f"{adapter.blocks_path}.{i}.{rel}")
            if module is not None:
                norms[f"{adapter.blocks_path}.{i}.{rel}"] = module
    readers, reference = _readers(model, norms)
    reasons = dict.fromkeys(gathered, "its input is not a block norm's output")
    for norm, names in readers.items():
        mine = [name for name in names if name in gathered]
        if not mine:
            continue
        ungathered = [name for name in names if name not in gathered]
        distinct = {tuple(gathered[name].tolist()) for name in mine}
        if ungathered:
            reasons.update(dict.fromkeys(mine, f"{norm} also feeds {ungathered[0]}, which reads it ungathered"))
        elif len(distinct) > 1:
            reasons.update(dict.fromkeys(mine, f"the {len(mine)} readers of {norm} use {len(distinct)} different "
                                               "permutations: one gather each"))
        else:
            result.norms[norm] = mine
    for norm, names in result.norms.items():
        _move(model, names, norm)
    if result.norms:
        folded = primary_output(run_model(model, probe_input(model)))
        if not torch.equal(folded, reference):
            for norm, names in result.norms.items():
                _unmove(model, names, norm)
            reasons.update({name: "folding into the norms changed the output (a norm output has another reader)"
                            for names in result.norms.values() for name in names})
            result.norms = {}
    moved = {name for names in result.norms.values() for name in names}
    result.kept = {name: reason for name, reason in reasons.items() if name not in moved}
    return result


def _move(model: nn.Module, readers: list[str], norm_name: str) -> None:
    """The norm emits its readers' (common) gather; they lose theirs."""
    perm = None
    for name in readers:
        module = model.get_submodule(name)
        module.__dict__.pop(HANDLE).remove()
        perm = module._buffers.pop(GATHER)
    norm = model.get_submodule(norm_name)
    norm.register_buffer(GATHER, perm, persistent=False)
    norm.__dict__[HANDLE] = norm.register_forward_hook(_emit_gather)


def _unmove(model: nn.Module, readers: list[str], norm_name: str) -> None:
    norm = model.get_submodule(norm_name)
    norm.__dict__.pop(HANDLE).remove()
    perm = norm._buffers.pop(GATHER)
    attach_gathers(model, dict.fromkeys(readers, perm))
