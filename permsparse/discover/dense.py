"""The parameters of a block that belong to no linear layer and are kept dense, each with the reason.

Hybrid mixers hold parameters that are not linear maps of their input: a state-space layer's short
convolution over positions and its decay, skip and step parameters (``A_log``, ``D``, ``dt_bias``), the norm
inside it; a mixture-of-experts router holds state besides its weight (a score-correction bias). None of them
is pruned, and none is moved by a permutation (discovery verifies every fold and stream permutation with
them in place, so whatever they would break is found there). Each is recognised from the model – the
module that owns it, its shape – and listed with why it stays dense, so the record says what was left.

What cannot be kept dense silently is named, to be refused: weights of three or more axes that look like
packed experts (one matrix per expert, not split into linears) would leave most of a mixture-of-experts model
unpruned.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .linears import is_linear, is_packed_experts

CONVOLUTION = "convolution over positions"
STATE = "state-space / recurrence parameter of {module}, not a linear layer's"
OWN = "parameter of {module}'s own computation (a bias or scale outside its linears)"
NORM = "norm inside {module}, acting on its own channels"
ROUTER = "router state of {router} (routing only)"
PER_LAYER = "embedding of the per-layer inputs, not a linear layer"
UNCALLED = "a linear's weight that {owner} uses itself (never called as a module): no statistics of its inputs"


@dataclass(frozen=True)
class KeptDense:
    """A parameter (block-relative name) that stays dense, and why."""

    name: str
    reason: str


def _is_norm(module: nn.Module) -> bool:
    """A leaf module whose parameters are all vectors: a norm or a scale."""
    params = list(module.parameters(recurse=False))
    return bool(params) and not any(True for _ in module.children()) and all(p.dim() == 1 for p in params)


def _looks_packed(module: nn.Module, param: torch.Tensor) -> bool:
    """A weight of three or more axes that is not a convolution's: one matrix per expert (or per head)."""
    return (not isinstance(module, nn.modules.conv._ConvNd) and param.dim() >= 3
            and sum(size > 1 for size in param.shape) >= 3)


def kept_dense(block: nn.Module, routers: tuple[str, ...] = ()) -> tuple[KeptDense, ...]:
    """Every parameter of ``block`` that no linear owns and no norm on the residual stream is, with the reason
    it stays dense (``routers``: block-relative modules of mixture-of-experts routers, whose other state is
    listed as theirs). Vectors of plain norms and scales of the block are not listed (nothing to prune), nor
    packed weights left unsplit (:func:`unsplit_weights` names them: they are refused)."""
    return _classified(block, routers)[0]


def unsplit_weights(block: nn.Module, routers: tuple[str, ...] = ()) -> list[str]:
    """Packed weights of ``block`` that no layout split into linears, named with their module and shape."""
    return _classified(block, routers)[1]


def _classified(block: nn.Module, routers: tuple[str, ...]) -> tuple[tuple[KeptDense, ...], list[str]]:
    found, packed = [], []
    owners = {name: module for name, module in block.named_modules()}
    for name, module in block.named_modules():
        if is_linear(module):
            continue
        own = [(pname, p) for pname, p in module.named_parameters(recurse=False)]
        if not own:
            continue
        router = next((r for r in routers if name == r or name.startswith(r + ".")), None)
        for pname, param in own:
            full = f"{name}.{pname}" if name else pname
            if router is not None:
                if name != router or pname not in ("weight", "bias"):
                    found.append(KeptDense(full, ROUTER.format(router=router)))
                continue
            if is_packed_experts(module) or _looks_packed(module, param):
                packed.append(f"{full} ({type(module).__name__}, {tuple(param.shape)})")
            elif isinstance(module, nn.modules.conv._ConvNd):
                found.append(KeptDense(full, CONVOLUTION))
            elif isinstance(module, nn.Embedding):
                found.append(KeptDense(full, PER_LAYER))
            elif _is_norm(module):
                parent = _owner_with_own_state(owners, name)
                if parent is not None:
                    found.append(KeptDense(full, NORM.format(module=type(parent).__name__)))
            else:
                recurrent = _in_mixer_with_convolution(owners, name)
                found.append(KeptDense(full, (STATE if recurrent else OWN).format(module=type(module).__name__)))
    return tuple(found), packed


def uncalled_linears(block: nn.Module, called: tuple[str, ...]) -> tuple[KeptDense, ...]:
    """The parameters of the linears of ``block`` that the traced forward pass never called: their owner uses
    the weight itself (Mamba's ``dt_proj.weight @ x``), so no hook sees their inputs and no statistics exist."""
    return tuple(KeptDense(f"{name}.{pname}", UNCALLED.format(owner=name.rpartition(".")[0] or "the block"))
                 for name, module in block.named_modules() if is_linear(module) and name not in called
                 for pname, _ in module.named_parameters(recurse=False))


def _owner_with_own_state(owners: dict[str, nn.Module], name: str) -> nn.Module | None:
    """The nearest enclosing module of ``name`` that holds parameters of its own that are not a norm's (a
    state-space mixer holding ``A_log``, ``D``), or None: the norm is then a plain norm of the block."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):  # the block itself is not a mixer
        parent = owners.get(".".join(parts[:end]))
        if parent is None or is_linear(parent):
            continue
        if any(True for _ in parent.parameters(recurse=False)) and not _is_norm(parent):
            return parent
        if any(isinstance(m, nn.modules.conv._ConvNd) for m in parent.children()):
            return parent
    return None


def _in_mixer_with_convolution(owners: dict[str, nn.Module], name: str) -> bool:
    """Whether the module ``name`` or one enclosing it inside the block holds a convolution over positions:
    a state-space or gated linear-attention mixer, whose own parameters (decay, skip, step) act along the
    recurrence."""
    parts = name.split(".")
    return any(any(isinstance(m, nn.modules.conv._ConvNd) for m in owners[".".join(parts[:end])].modules())
               for end in range(len(parts), 0, -1) if ".".join(parts[:end]) in owners)
