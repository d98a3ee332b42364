"""How a linear layer stores its weight, and exact permutations of its rows and columns.

A linear's weight is handled as ``(out, in)`` everywhere; GPT-2's Conv1D stores it transposed, and that is
known only here. Permuting rows or columns only moves values, so a permutation and its inverse restore a
weight bit for bit.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


ROUTED = ("hidden_states", "top_k_index", "top_k_weights")


def is_packed_experts(module: nn.Module) -> bool:
    """A module that stores its experts' projections packed: 3-D ``gate_up_proj`` (or, without a gate,
    ``up_proj``) and ``down_proj`` parameters; one matrix per expert in a 3-D ``weight`` of a module that reads
    the tokens sorted by expert (``forward(inputs, expert_size)``); or a module that routes tokens to experts
    (``forward(hidden_states, top_k_index, top_k_weights)``) and holds parameters but no linear layer."""
    params = dict(module.named_parameters(recurse=False))
    if "down_proj" in params and params["down_proj"].dim() == 3 and any(
            name in params and params[name].dim() == 3 for name in ("gate_up_proj", "up_proj")):
        return True
    if is_linear(module):
        return False
    arguments = _forward_arguments(module)
    if "weight" in params and params["weight"].dim() == 3 and arguments == ("inputs", "expert_size"):
        return True
    return (arguments == ROUTED and any(True for _ in module.parameters())
            and not any(is_linear(m) for m in module.modules()))


def _forward_arguments(module: nn.Module) -> tuple[str, ...]:
    try:
        return tuple(inspect.signature(type(module).forward).parameters)[1:]
    except (TypeError, ValueError):
        return ()


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)`` (a view: writing to it writes the module's weight)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def stored_layout(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """An ``(out, in)`` weight in the layout ``module`` stores it (GPT-2's Conv1D: transposed)."""
    return weight.T if isinstance(module, Conv1D) else weight


@torch.no_grad()
def permute_rows(module: nn.Module, perm: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Reorder output rows of a linear (and its bias) among ``rows`` (all rows when None): the row at
    ``rows[j]`` becomes the old row ``rows[perm[j]]``."""
    weight = linear_weight(module)
    rows = torch.arange(weight.shape[0]) if rows is None else rows
    rows, source = rows.to(weight.device), rows[perm.cpu()].to(weight.device)
    weight[rows] = weight[source]
    bias = getattr(module, "bias", None)
    if bias is not None:
        bias[rows] = bias[source]


@torch.no_grad()
def permute_columns(module: nn.Module, perm: torch.Tensor) -> None:
    """Reorder the input columns of a linear: new column j = old column perm[j]."""
    weight = linear_weight(module)
    weight.copy_(weight[:, perm.to(weight.device)])


@torch.no_grad()
def permute_vector(param: torch.Tensor | None, perm: torch.Tensor) -> None:
    if param is not None:
        param.copy_(param[perm.to(param.device)])
