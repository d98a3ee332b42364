"""Packed mixture-of-experts weights as one linear per expert projection, and back.

transformers 5 stores the experts of a MoE layer packed, in several layouts:

- 3-D ``gate_up_proj`` ``(E, 2I, H)`` (gate rows then up rows, or interleaved) and ``down_proj`` ``(E, H, I)``,
  optionally transposed (``(E, in, out)``) and with biases, joined by the module's ``_apply_gate``; without a
  gate (Nemotron-H), 3-D ``up_proj`` and ``down_proj`` with an activation between them. The module's
  ``forward(hidden_states, top_k_index, top_k_weights)`` sends each token to the experts its router chose;
- the same tensors, transposed, in a module that reads one block of rows per expert, the tokens already
  scaled by their routing weight (zero where the router did not choose the expert: Llama 4), gate and up
  joined as ``act(gate) * up``;
- 2-D ``w1``, ``v1``, ``w2`` of ``E * I`` rows each (gate, up, and the transposed down projection of every
  expert, one after the other: DBRX) inside a routed module;
- one 3-D ``weight`` ``(E, out, in)`` per projection in a module that reads the tokens sorted by expert,
  ``forward(inputs, expert_size)`` (JetMoE's experts, for its MLP and for its attention's query and output).

Statistics, masks, permutations and folds work on linears, so :func:`experts_as_linears` swaps each such
module for :class:`ExpertLinears` (or :class:`ParallelLinears`, for the last layout) while it is open: per
expert ``gate_proj``, ``up_proj`` and ``down_proj`` ``nn.Linear`` modules whose weights are *views* of the
packed tensors. Pruning or permuting one of them writes the packed parameter in place, and putting the
original module back on exit is exact and costs nothing. Each expert's linears read only the tokens routed
to it, so the statistics hooked on them are those tokens'.

The routers (the MoE block's other weights with one row per expert, or the single row of a shared
expert's gate) stay dense: :func:`routers` names them. :func:`every_expert_runs` makes every expert read
every token (routing weight plus ``1/E``), so one forward pass on a few tokens shows every expert's
structure to discovery; it changes how expert outputs are mixed, never what an expert computes.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .linears import ROUTED, is_packed_experts
from .trace import NotUnderstood


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


@dataclass(frozen=True)
class _Joined:
    """The packed module's own gating of the joined gate and up outputs, in the layout it stores them."""

    gate: Callable
    concatenated: bool

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        joined = torch.cat([gate, up], -1) if self.concatenated else torch.stack([gate, up], -1).flatten(-2)
        return self.gate(joined)


@dataclass(frozen=True)
class _Product:
    """``act(gate) * up``."""

    act: Callable

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self.act(gate) * up


class Expert(nn.Module):
    """One expert as linears: ``down_proj(combine(gate_proj(x), up_proj(x)))``, where ``combine`` is the
    family's own gating; without a gate projection ``down_proj(combine(up_proj(x)))`` (an activation)."""

    def __init__(self, gate_proj: nn.Linear | None, up_proj: nn.Linear, down_proj: nn.Linear, combine: Callable):
        super().__init__()
        if gate_proj is not None:
            self.gate_proj = gate_proj
        self.up_proj, self.down_proj = up_proj, down_proj
        object.__setattr__(self, "_combine", combine)  # may hold the packed module: not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "gate_proj"):
            return self.down_proj(self._combine(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(self._combine(self.up_proj(x)))


class ExpertLinears(nn.ModuleList):
    """A packed experts module's computation, as a list of one :class:`Expert` of linears per expert (so
    expert 3's gate projection is ``...experts.3.gate_proj``; see the module docstring); the packed
    module is kept, out of the module tree, to be put back."""

    def __init__(self, packed: nn.Module, name: str):
        super().__init__()
        experts, problem = _split(packed)
        if problem:
            raise NotUnderstood(f"the experts of {name} ({type(packed).__name__}): {problem}")
        object.__setattr__(self, "packed", packed)
        self.num_experts = len(experts)
        self.probe = False
        self.presorted = _arguments(packed) == ("hidden_states",)
        self.extend(experts)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None):
        if self.presorted:
            return self._presorted(hidden_states)
        shape = hidden_states.shape  # (tokens, hidden), or (batch, positions, hidden) flattened here (DBRX)
        hidden_states = hidden_states.reshape(-1, shape[-1])
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
        return final.view(shape)

    def _presorted(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """One block of rows per expert, already scaled by the routing weight: an expert reads the rows its
        router chose (the non-zero ones; every row while probing)."""
        rows = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
        outputs = []
        for e, expert in enumerate(self):
            x = rows[e]
            if self.probe:
                outputs.append(expert(x))
                continue
            with torch.no_grad():
                tokens = torch.where((x != 0).any(-1))[0]
            out = x.new_zeros(x.shape[0], self[e].down_proj.out_features)
            if tokens.numel():
                out = out.index_add(0, tokens, expert(x[tokens]).to(out.dtype))
            outputs.append(out)
        return torch.cat(outputs, 0)


class ParallelLinears(nn.ModuleList):
    """A module holding one ``(out, in)`` matrix per expert in a 3-D ``weight`` and reading the tokens sorted
    by expert (``forward(inputs, expert_size)``), as one ``nn.Linear`` per expert (views of the packed
    weight): expert ``e`` reads its own rows. While probing every linear reads every row (its output kept
    only for its own), so discovery sees every expert."""

    def __init__(self, packed: nn.Module, name: str):
        super().__init__()
        weight = packed.weight
        object.__setattr__(self, "packed", packed)
        self.num_experts = weight.shape[0]
        self.probe = False
        self.extend(_linear(weight.detach()[e], None, weight.requires_grad) for e in range(self.num_experts))

    def forward(self, inputs: torch.Tensor, expert_size) -> torch.Tensor:
        sizes = [int(n) for n in expert_size]
        starts = [sum(sizes[:e]) for e in range(len(sizes))]
        outputs = []
        for linear, start, size in zip(self, starts, sizes):
            if self.probe:  # a copy each: the experts read different tokens, no shared input
                outputs.append(linear(inputs.clone())[start:start + size])
            elif size:
                outputs.append(linear(inputs[start:start + size]))
            else:
                outputs.append(inputs.new_zeros(0, linear.out_features))
        return torch.cat(outputs, 0)


def _arguments(module: nn.Module) -> tuple[str, ...]:
    from .linears import _forward_arguments

    return _forward_arguments(module)


def _split(packed: nn.Module) -> tuple[list[Expert], str]:
    """One :class:`Expert` of views per expert of ``packed``, or why it cannot be split."""
    if getattr(packed, "has_post_expert_norm", False):
        return [], "a norm after each expert is not supported"
    arguments = _arguments(packed)
    if len(arguments) != len(ROUTED) and arguments != ("hidden_states",):
        return [], f"its forward takes {arguments}, not the routed {ROUTED}"
    params = dict(packed.named_parameters(recurse=False))
    if "gate_up_proj" in params:
        return _split_gated(packed, arguments)
    if "up_proj" in params:
        act = getattr(packed, "act_fn", None)
        if getattr(packed, "has_gate", True) or not callable(act):
            return [], "an up_proj without has_gate=False and an act_fn is not supported"
        return _split_views(packed, None, packed.up_proj, packed.down_proj, act, False), ""
    packed_2d = [m for m in packed.children() if {"w1", "v1", "w2"} <= dict(m.named_parameters(recurse=False)).keys()]
    if len(packed_2d) == 1 and len(arguments) == len(ROUTED):
        glu = packed_2d[0]
        act = getattr(glu, "activation_fn", None)
        count = getattr(packed, "num_experts", 0)
        if not callable(act) or not count or glu.w1.shape[0] % count:
            return [], "w1/v1/w2 without an activation_fn or num_experts dividing their rows"
        shape = (count, glu.w1.shape[0] // count, glu.w1.shape[1])  # (E, I, H): w1 and v1 (out, in), w2 (in, out)
        views = [p.detach().view(shape) for p in (glu.w1, glu.v1, glu.w2)]
        grad = glu.w1.requires_grad
        experts = [Expert(_linear(views[0][e], None, grad), _linear(views[1][e], None, grad),
                          _linear(views[2][e].T, None, grad), _Product(act)) for e in range(count)]
        return experts, ""
    return [], "no packed layout of experts this version knows (gate_up_proj, up_proj, or w1/v1/w2)"


def _split_gated(packed: nn.Module, arguments: tuple[str, ...]) -> tuple[list[Expert], str]:
    gate_up, down = packed.gate_up_proj, packed.down_proj
    if not getattr(packed, "has_gate", True):
        return [], "experts without a gate projection are not supported"
    transposed = getattr(packed, "is_transposed", None)
    if callable(getattr(packed, "_apply_gate", None)):
        combine = _Joined(packed._apply_gate, getattr(packed, "is_concatenated", True))
        concatenated = combine.concatenated
    elif arguments == ("hidden_states",) and callable(getattr(packed, "act_fn", None)):
        combine, concatenated = _Product(packed.act_fn), True  # gate and up halves of one product: act(gate) * up
        transposed = gate_up.shape[1] == down.shape[2] if transposed is None else transposed
    else:
        return [], "no _apply_gate method says how its gate and up projections combine"
    if getattr(packed, "has_bias", False) and not all(hasattr(packed, f"{n}_bias")
                                                      for n in ("gate_up_proj", "down_proj")):
        return [], "has_bias is set but gate_up_proj_bias/down_proj_bias are missing"
    return _split_views(packed, gate_up, None, down, combine, bool(transposed), concatenated), ""


def _split_views(packed: nn.Module, gate_up: torch.Tensor | None, up: torch.Tensor | None, down: torch.Tensor,
                 combine: Callable, transposed: bool, concatenated: bool = True) -> list[Expert]:
    """Views of the packed tensors per expert: gate and up rows of ``gate_up`` (halves, or interleaved), or
    ``up`` alone; ``down``; their biases when the module has them."""
    transposed = transposed or bool(getattr(packed, "is_transposed", False))
    bias = getattr(packed, "has_bias", False)
    grad = down.requires_grad
    everything = slice(None)
    experts = []
    if gate_up is not None:
        width = (gate_up.shape[2] if transposed else gate_up.shape[1]) // 2
        gate_rows, up_rows = ((slice(0, width), slice(width, 2 * width)) if concatenated
                              else (slice(0, None, 2), slice(1, None, 2)))
    for e in range(down.shape[0]):
        db = packed.down_proj_bias.detach()[e] if bias else None
        down_linear = _linear(_expert_view(down, e, everything, transposed), db, grad)
        if gate_up is None:
            ub = packed.up_proj_bias.detach()[e] if bias and hasattr(packed, "up_proj_bias") else None
            experts.append(Expert(None, _linear(_expert_view(up, e, everything, transposed), ub, grad), down_linear,
                                  combine))
            continue
        gb = packed.gate_up_proj_bias.detach()[e] if bias else None
        experts.append(Expert(
            _linear(_expert_view(gate_up, e, gate_rows, transposed), None if gb is None else gb[gate_rows], grad),
            _linear(_expert_view(gate_up, e, up_rows, transposed), None if gb is None else gb[up_rows], grad),
            down_linear, combine))
    return experts


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
            split = ParallelLinears if _arguments(packed) == ("inputs", "expert_size") else ExpertLinears
            _set(model, name, split(packed, name))
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
        if not isinstance(module, (ExpertLinears, ParallelLinears)):
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
    split = [module for module in model.modules() if isinstance(module, (ExpertLinears, ParallelLinears))]
    for module in split:
        module.probe = True
    try:
        yield
    finally:
        for module in split:
            module.probe = False
