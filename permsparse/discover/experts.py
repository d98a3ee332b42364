"""Packed mixture-of-experts weights as one linear per expert projection, and back.

transformers 5 stores the experts of a MoE layer as 3-D parameters: ``gate_up_proj`` ``(E, 2I, H)`` (gate
rows then up rows, or interleaved), ``down_proj`` ``(E, H, I)``, optionally transposed (``(E, in, out)``)
and with biases; the module's ``forward(hidden_states, top_k_index, top_k_weights)`` sends each token to
the experts its router chose. Statistics, masks, permutations and folds work on linears, so
:func:`experts_as_linears` swaps each such module for :class:`ExpertLinears` while it is open: per expert a
``gate_proj``, ``up_proj`` and ``down_proj`` ``nn.Linear`` whose weights are *views* of the packed
tensors. Pruning or permuting one of them writes the packed parameter in place, and putting the
original module back on exit is exact and costs nothing. Each expert's linears read only the tokens
routed to it, so the statistics hooked on them are those tokens'.

The routers (the MoE block's other weights with one row per expert, or the single row of a shared
expert's gate) stay dense: :func:`routers` names them. :func:`every_expert_runs` makes every expert read
every token (routing weight plus ``1/E``), so one forward pass on a few tokens shows every expert's
structure to discovery; it changes how expert outputs are mixed, never what an expert computes.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
from torch import nn

from .linears import is_packed_experts
from .trace import NotUnderstood

FORWARD = ("hidden_states", "top_k_index", "top_k_weights")


def _expert_view(param: torch.Tensor, e: int, rows: slice, transposed: bool) -> torch.Tensor:
    """Expert ``e``'s ``(out, in)`` weight (rows ``rows`` of its output), a view of the packed ``param``."""
    data = param.detach()[e]
    return data[:, rows].T if transposed else data[rows]


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    """An ``nn.Linear`` whose parameters are the given tensors themselves (views: no copy)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=requires_grad)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=requires_grad)
    return linear


class Expert(nn.Module):
    """One expert as three linears: ``down_proj(gate(gate_proj(x), up_proj(x)))``, where ``gate`` is the
    family's own gating of the joined projections, in the layout the packed module stores them."""

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, packed: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self._concatenated = getattr(packed, "is_concatenated", True)
        object.__setattr__(self, "_gate", packed._apply_gate)  # a method of the packed module, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        joined = torch.cat([gate, up], -1) if self._concatenated else torch.stack([gate, up], -1).flatten(-2)
        return self.down_proj(self._gate(joined))


class ExpertLinears(nn.ModuleList):
    """A packed experts module's computation, as a list of one :class:`Expert` of linears per expert (so
    expert 3's gate projection is ``...experts.3.gate_proj``; see the module docstring); the packed
    module is kept, out of the module tree, to be put back."""

    def __init__(self, packed: nn.Module, name: str):
        super().__init__()
        problem = _unsupported(packed)
        if problem:
            raise NotUnderstood(f"the experts of {name} ({type(packed).__name__}): {problem}")
        object.__setattr__(self, "packed", packed)
        self.num_experts = packed.gate_up_proj.shape[0]
        self.probe = False
        transposed, concatenated = bool(getattr(packed, "is_transposed", False)), getattr(packed, "is_concatenated", True)
        gate_up, down = packed.gate_up_proj, packed.down_proj
        width = (gate_up.shape[2] if transposed else gate_up.shape[1]) // 2
        gate_rows, up_rows = ((slice(0, width), slice(width, 2 * width)) if concatenated
                              else (slice(0, None, 2), slice(1, None, 2)))
        everything = slice(None)
        bias = getattr(packed, "has_bias", False)
        grad = gate_up.requires_grad
        experts = []
        for e in range(self.num_experts):
            gb = packed.gate_up_proj_bias.detach()[e] if bias else None
            db = packed.down_proj_bias.detach()[e] if bias else None
            experts.append(Expert(
                _linear(_expert_view(gate_up, e, gate_rows, transposed), None if gb is None else gb[gate_rows], grad),
                _linear(_expert_view(gate_up, e, up_rows, transposed), None if gb is None else gb[up_rows], grad),
                _linear(_expert_view(down, e, everything, transposed), db, grad), packed))
        self.extend(experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        final = torch.zeros_like(hidden_states)
        count = self.num_experts
        if self.probe:
            routed = top_k_weights.new_zeros(hidden_states.shape[0], count + 1)
            routed = routed.scatter_add(1, top_k_index, top_k_weights)[:, :count] + 1.0 / count
        else:
            with torch.no_grad():  # which tokens each expert reads, as the packed module routes them
                hits = nn.functional.one_hot(top_k_index, num_classes=count + 1).permute(2, 1, 0)
        for e, expert in enumerate(self):
            if self.probe:
                tokens = torch.arange(hidden_states.shape[0], device=hidden_states.device)
                weights = routed[:, e]
            else:
                positions, tokens = torch.where(hits[e])
                if not tokens.numel():
                    continue
                weights = top_k_weights[tokens, positions]
            out = expert(hidden_states[tokens]) * weights[:, None]
            final.index_add_(0, tokens, out.to(final.dtype))
        return final


def _unsupported(packed: nn.Module) -> str:
    """Why a packed experts module cannot be split into linears ("" when it can)."""
    if not getattr(packed, "has_gate", True):
        return "experts without a gate projection are not supported"
    if getattr(packed, "has_post_expert_norm", False):
        return "a norm after each expert is not supported"
    if not callable(getattr(packed, "_apply_gate", None)):
        return "no _apply_gate method says how its gate and up projections combine"
    names = tuple(inspect.signature(type(packed).forward).parameters)[1:]
    if len(names) != len(FORWARD):
        return f"its forward takes {names}, not the routed {FORWARD}"
    if getattr(packed, "has_bias", False) and not all(hasattr(packed, f"{n}_bias") for n in ("gate_up_proj", "down_proj")):
        return "has_bias is set but gate_up_proj_bias/down_proj_bias are missing"
    return ""


def _packed_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if is_packed_experts(module)]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@contextmanager
def experts_as_linears(model: nn.Module):
    """Within the block, every packed experts module of ``model`` is an :class:`ExpertLinears` (its
    weights views of the packed tensors); the packed modules are back on exit. Yields their names.
    Nested use is a no-op inside."""
    found = _packed_modules(model)
    swapped = []
    try:
        for name, packed in found:
            _set(model, name, ExpertLinears(packed, name))
            swapped.append((name, packed))
        yield [name for name, _ in found]
    finally:
        for name, packed in reversed(swapped):
            _set(model, name, packed)


def routers(model: nn.Module) -> list[str]:
    """Full names of the modules that route tokens to split experts: the other children of each
    :class:`ExpertLinears`' parent holding a 2-D ``weight`` with one row per expert (a router) or one row
    (a shared expert's gate), and deeper modules of that parent with one row per expert (a router kept
    inside a gate module)."""
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, ExpertLinears):
            continue
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if parent_name else model
        inside = {id(m) for m in module.modules()}
        for rel, child in parent.named_modules():
            weight = getattr(child, "weight", None)
            if not rel or id(child) in inside or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                continue
            rows = (module.num_experts, 1) if "." not in rel else (module.num_experts,)
            if weight.shape[0] in rows:
                found.append(f"{parent_name}.{rel}" if parent_name else rel)
    return found


@contextmanager
def every_expert_runs(model: nn.Module):
    """Within the block, every :class:`ExpertLinears` of ``model`` runs every expert on every token."""
    split = [module for module in model.modules() if isinstance(module, ExpertLinears)]
    for module in split:
        module.probe = True
    try:
        yield
    finally:
        for module in split:
            module.probe = False
