"""The module graph and one traced forward pass: where the blocks are, what reads what.

Hooks record every linear's input tensor and the autograd nodes of its input and output. Each block's
hidden input, and each embedding's output, is replaced by a fresh tensor that starts its own autograd
graph, so walking a tensor's graph back, stopping at linear outputs and at the block's input, tells
which linears of the block feed it and whether the residual stream does. Linears whose inputs are the
same tensor read one input (a shared site).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from .dense import unsplit_weights
from .linears import is_linear, is_packed_experts
from .towers import find_towers, main_input

PROBE_SHAPE = (1, 16)
PROBE_SEED = 0
INPUT = "<block input>"
LAST = "<last block output>"


class NotUnderstood(ValueError):
    """A part of the model's structure that discovery does not understand; the message names it."""


def probe_input(model: nn.Module) -> torch.Tensor:
    """The seeded input discovery runs the model on: token ids, or standard-normal images of the
    config's ``image_size`` for a model whose main input is ``pixel_values``."""
    parameter = next(model.parameters())
    kind = main_input(model)
    generator = torch.Generator().manual_seed(PROBE_SEED)
    if kind == "pixel_values":
        size = getattr(model.config, "image_size", None)
        if not size:
            raise NotUnderstood(f"{type(model).__name__} reads pixel values but its config states no image_size")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        shape = (PROBE_SHAPE[0], getattr(model.config, "num_channels", 3), height, width)
        return torch.randn(shape, generator=generator).to(parameter.device, parameter.dtype)
    if kind != "input_ids":
        raise NotUnderstood(f"{type(model).__name__} reads {kind}: only token ids and pixel values are supported")
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise NotUnderstood(f"{type(model).__name__} reads no token ids (its input embedding is a "
                            f"{type(embedding).__name__}): only text and image models are supported")
    ids = torch.randint(0, embedding.num_embeddings, PROBE_SHAPE, generator=generator)
    return ids.to(parameter.device)


def primary_output(outputs) -> torch.Tensor:
    """What a model computes: its logits, or its final hidden states when it has no head."""
    logits = getattr(outputs, "logits", None)
    return logits if logits is not None else outputs.last_hidden_state


def model_inputs(model: nn.Module, batch: torch.Tensor) -> dict:
    """The keyword arguments that feed ``batch`` to ``model`` as its main input (token ids, pixel values),
    with ``use_cache=False`` for a model that keeps a cache (one whole pass, nothing kept)."""
    inputs = {main_input(model): batch}
    if hasattr(model.config, "use_cache"):
        inputs["use_cache"] = False
    return inputs


def run_model(model: nn.Module, batch: torch.Tensor):
    """The model on its main input, without a cache (discovery looks at one whole pass)."""
    return model(**model_inputs(model, batch))


def find_blocks(model: nn.Module) -> str:
    """The path of the stack of Transformer blocks: the outermost ModuleList of modules holding linears
    with the most parameters (in a vision-language model, within its language tower); an error when there
    is none, or when another stack is nearly as large."""
    towers = find_towers(model)
    within = "" if towers is None else towers.language + "."
    stacks = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or not len(module) or any(name.startswith(s + ".") for s, _ in stacks):
            continue
        if not name.startswith(within):
            continue
        if all(any(is_linear(m) for m in child.modules()) for child in module):
            stacks.append((name, sum(p.numel() for p in module.parameters())))
    if not stacks:
        raise NotUnderstood(f"{type(model).__name__}: no stack of Transformer blocks found "
                            "(a ModuleList of blocks holding linear layers)")
    stacks.sort(key=lambda s: -s[1])
    if len(stacks) > 1 and 2 * stacks[1][1] >= stacks[0][1]:
        raise NotUnderstood(f"{type(model).__name__}: several stacks of blocks ({', '.join(s for s, _ in stacks)}); "
                            "models with more than one stack (encoder-decoder, vision towers) are not supported")
    return stacks[0][0]


def check_blocks(model: nn.Module, blocks_path: str, dense: tuple[str, ...] = ()) -> None:
    """No packed expert weights left unsplit, in any block (every other weight of no linear stays dense:
    :func:`permsparse.discover.dense.kept_dense`; ``dense``: full names of routers); blocks may hold
    different linears (blocks of several kinds, :func:`block_layout`)."""
    blocks = model.get_submodule(blocks_path)
    packed = []
    for name, module in blocks.named_modules():
        if is_packed_experts(module) and f"{blocks_path}.{name}" not in dense:
            packed += [f"{blocks_path}.{name}.{p}" for p, param in module.named_parameters(recurse=False)
                       if param.dim() == 3]
    if packed:
        raise NotUnderstood(f"packed expert parameters {', '.join(packed[:4])}{' ...' if len(packed) > 4 else ''} "
                            "(3-D, mixture of experts) are not split into linears (discover them inside "
                            "permsparse.discover.experts_as_linears)")
    for i, block in enumerate(blocks):
        prefix = f"{blocks_path}.{i}."
        unsplit = unsplit_weights(block, tuple(d.removeprefix(prefix) for d in dense if d.startswith(prefix)))
        if unsplit:
            raise NotUnderstood(f"{blocks_path}.{i}: packed weights that are split into no linear layer: "
                                f"{', '.join(unsplit[:4])}{' ...' if len(unsplit) > 4 else ''}")


def block_layout(block: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """The linears of a block with the shapes of their weights: blocks of one layout may be of one kind."""
    return tuple((n, tuple(m.weight.shape)) for n, m in block.named_modules() if is_linear(m))


@dataclass
class Traced:
    """What one forward pass showed: per linear (first call, forward order) its input and the autograd
    nodes of its input and output; per parameter-holding channel module (a norm) the same nodes; the
    nodes where embeddings, blocks' inputs and blocks' outputs enter the graph; the model's output."""

    linears: dict[str, tuple[torch.Tensor, object, object]] = field(default_factory=dict)
    channels: dict[str, tuple[object, object]] = field(default_factory=dict)
    embeddings: dict[object, str] = field(default_factory=dict)
    block_inputs: dict[int, object] = field(default_factory=dict)
    block_sources: dict[int, torch.Tensor] = field(default_factory=dict)
    block_outputs: dict[int, object] = field(default_factory=dict)
    output: torch.Tensor | None = None


def _channel_module(module: nn.Module) -> bool:
    """A module owning parameters, all of them vectors (norms, scales): it acts channel by channel."""
    params = list(module.parameters(recurse=False))
    return bool(params) and not is_linear(module) and not isinstance(module, nn.Embedding) \
        and all(p.dim() == 1 for p in params) and not any(True for _ in module.children())


def _fresh(tensor: torch.Tensor) -> torch.Tensor:
    """The same values, starting a new autograd graph (a clone of a leaf, so in-place updates stay legal)."""
    return tensor.detach().requires_grad_(True).clone()


def trace(model: nn.Module, blocks_path: str, inputs: torch.Tensor) -> Traced:
    """Run ``model`` once on ``inputs`` with gradients recorded and hooks on every module that matters."""
    traced = Traced()
    blocks = model.get_submodule(blocks_path)
    handles = []

    def linear_hook(name):
        def hook(_module, args, output):
            if name not in traced.linears:
                out = output if isinstance(output, torch.Tensor) else output[0]  # a router's (logits, choices)
                traced.linears[name] = (args[0], args[0].grad_fn, out.grad_fn)
        return hook

    def channel_hook(name):
        def hook(_module, args, output):
            if name not in traced.channels and args and isinstance(output, torch.Tensor):
                traced.channels[name] = (args[0].grad_fn, output.grad_fn)
        return hook

    def embedding_hook(name):
        def hook(_module, _args, output):
            if not isinstance(output, torch.Tensor):  # an embedding returning more (ProphetNet's positions): not a stream start
                return None
            fresh = _fresh(output)
            traced.embeddings[fresh.grad_fn] = name
            return fresh
        return hook

    def block_pre_hook(i, hidden_name):
        def hook(_module, args, kwargs):
            if i in traced.block_inputs:
                return None
            source = args[0] if args else kwargs[hidden_name]
            fresh = _fresh(source)
            traced.block_sources[i], traced.block_inputs[i] = source, fresh.grad_fn
            if args:
                return (fresh, *args[1:]), kwargs
            return args, {**kwargs, hidden_name: fresh}
        return hook

    def block_hook(i):
        def hook(_module, _args, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            traced.block_outputs.setdefault(i, out.grad_fn)
        return hook

    try:
        for name, module in model.named_modules():
            if is_linear(module):
                handles.append(module.register_forward_hook(linear_hook(name)))
            elif isinstance(module, nn.Embedding):
                handles.append(module.register_forward_hook(embedding_hook(name)))
            elif _channel_module(module):
                handles.append(module.register_forward_hook(channel_hook(name)))
        for i, block in enumerate(blocks):
            hidden_name = next(iter(inspect.signature(block.forward).parameters))
            handles.append(block.register_forward_pre_hook(block_pre_hook(i, hidden_name), with_kwargs=True))
            handles.append(block.register_forward_hook(block_hook(i)))
        with torch.enable_grad():
            traced.output = primary_output(run_model(model, inputs))
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i in range(len(blocks)) if i not in traced.block_outputs]
    if missing:
        raise NotUnderstood(f"{blocks_path}.{missing[0]} did not run in a forward pass")
    return traced


def reach(node, stops: dict, marks: dict | None = None) -> tuple[set, set]:
    """Walk the autograd graph back from ``node``: the labels of the ``stops`` reached (not walked past),
    and of the ``marks`` walked through."""
    found, marked, seen, stack = set(), set(), set(), [node]
    while stack:
        current = stack.pop()
        if current is None or current in seen:
            continue
        seen.add(current)
        if current in stops:
            found.add(stops[current])
            continue
        if marks is not None and current in marks:
            marked.add(marks[current])
        stack.extend(f for f, _ in current.next_functions)
    return found, marked


def _memory(tensor: torch.Tensor) -> tuple:
    """What identifies a tensor's values in memory: two linears reading this read the same input."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())


@dataclass(frozen=True)
class BlockFacts:
    """What one block's forward pass showed, in block-relative names and forward order.

    ``groups``: linears reading one input tensor. ``writers``: linears whose outputs reach the block's
    output through no other linear (they add to the residual stream). ``stream_readers``: linears whose
    input comes from the block's input or a writer's output (the residual stream). ``feeds``: for every
    other linear, the linears of the block its input comes from. ``norms``: channel modules acting on
    the stream.
    """

    linears: tuple[str, ...]
    groups: tuple[tuple[str, ...], ...]
    writers: tuple[str, ...]
    stream_readers: tuple[str, ...]
    feeds: tuple[tuple[str, tuple[str, ...]], ...]
    norms: tuple[str, ...]


def block_facts(traced: Traced, blocks_path: str, i: int) -> BlockFacts:
    prefix = f"{blocks_path}.{i}."
    calls = {name[len(prefix):]: call for name, call in traced.linears.items() if name.startswith(prefix)}
    order = list(calls)
    stops = {out: rel for rel, (_, _, out) in calls.items() if out is not None}
    stops[traced.block_inputs[i]] = INPUT

    def ordered(names) -> tuple[str, ...]:
        return tuple(n for n in order if n in names)

    writers = ordered(reach(traced.block_outputs[i], stops)[0])
    stream = set(writers) | {INPUT}
    readers, feeds = [], []
    for rel, (_, node, _) in calls.items():
        reached = reach(node, stops)[0]
        if reached & stream:
            readers.append(rel)
        else:
            feeds.append((rel, ordered(reached)))
    groups: dict[tuple, list[str]] = {}
    for rel, (tensor, _, _) in calls.items():
        groups.setdefault(_memory(tensor), []).append(rel)
    norms = []
    for name, (node_in, _) in traced.channels.items():
        if not name.startswith(prefix):
            continue
        reached = reach(node_in, stops)[0]
        if reached and reached <= stream:
            norms.append(name[len(prefix):])
    return BlockFacts(tuple(order), tuple(tuple(g) for g in groups.values()), writers, tuple(readers), tuple(feeds),
                      tuple(norms))


def leaf_parameters(node, stops: dict) -> list[torch.Tensor]:
    """The parameters (autograd leaves) the graph behind ``node`` starts from, not walking past ``stops``."""
    leaves, seen, stack = [], set(), [node]
    while stack:
        current = stack.pop()
        if current is None or current in seen or current in stops:
            continue
        seen.add(current)
        variable = getattr(current, "variable", None)
        if isinstance(variable, nn.Parameter):
            leaves.append(variable)
        stack.extend(f for f, _ in current.next_functions)
    return leaves


def stream_axis(module: nn.Module) -> int:
    """The axis of a parameter of ``module`` that holds the residual stream's channels when that
    parameter starts the stream: a convolution's output channels (a patch embedding), else the last."""
    return 0 if isinstance(module, nn.modules.conv._ConvNd) else -1


@dataclass(frozen=True)
class ModelFacts:
    """The residual stream outside the blocks (full names; see :class:`permsparse.discover.Adapter`), and
    whether the model's output is the final hidden state itself (an encoder without a head).

    ``stream_parameters``: parameters of no linear, embedding or norm that the first block's input is made
    from (a patch embedding's convolution, a class token, position embeddings), each holding the stream's
    channels on its :func:`stream_axis`; ``unplaced``: such parameters whose axis is not the stream's width.
    """

    token_embedding: str
    position_embeddings: tuple[str, ...]
    embedding_norms: tuple[str, ...]
    input_projection: str
    final_norms: tuple[str, ...]
    output_readers: tuple[str, ...]
    output_is_stream: bool
    stream_parameters: tuple[str, ...] = ()
    unplaced: tuple[str, ...] = ()
    side_readers: tuple[str, ...] = ()  # linears outside the blocks reading the embeddings besides the stream


def _stream_parameters(model: nn.Module, traced: Traced, stops: dict) -> tuple[tuple[str, ...], tuple[str, ...]]:
    owners = {id(p): (name, module) for name, module in model.named_modules() for p in module.parameters(recurse=False)}
    names = {id(p): name for name, p in model.named_parameters()}
    width = traced.block_sources[0].shape[-1]
    placed, unplaced = [], []
    for param in leaf_parameters(traced.block_sources[0].grad_fn, stops):
        _, module = owners[id(param)]
        if is_linear(module) or isinstance(module, nn.Embedding) or _channel_module(module):
            continue
        (placed if param.shape[stream_axis(module)] == width else unplaced).append(names[id(param)])
    order = list(names.values())
    return tuple(sorted(placed, key=order.index)), tuple(sorted(unplaced, key=order.index))


def model_facts(model: nn.Module, traced: Traced, blocks_path: str) -> ModelFacts:
    names = {module: name for name, module in model.named_modules()}
    token = names.get(model.get_input_embeddings(), "")
    outside = {name: call for name, call in traced.linears.items() if not name.startswith(blocks_path + ".")}
    linear_stops = {out: name for name, (_, _, out) in outside.items() if out is not None}
    norm_marks = {out: name for name, (_, out) in traced.channels.items()
                  if not name.startswith(blocks_path + ".") and out is not None}
    order = [name for name, _ in model.named_modules()]

    def ordered(found) -> tuple[str, ...]:
        return tuple(n for n in order if n in found)

    source = traced.block_sources[0]
    reached, before = reach(source.grad_fn, {**linear_stops, **traced.embeddings}, norm_marks)
    projections = ordered(reached & set(outside))
    if len(projections) > 1:
        raise NotUnderstood(f"the first block's input comes from several linears ({', '.join(projections)})")
    embeddings = ordered(reached - set(outside))
    parameters, unplaced = _stream_parameters(model, traced, {**linear_stops, **traced.embeddings})
    last = {traced.block_outputs[len(traced.block_outputs) - 1]: LAST}
    readers, after = [], set()
    for name, (_, node, _) in outside.items():
        found, marked = reach(node, {**linear_stops, **last}, norm_marks)
        if found == {LAST}:
            readers.append(name)
            after |= marked
    side = [name for name, (_, node, _) in outside.items() if name not in readers and name not in projections
            and reach(node, {**linear_stops, **traced.embeddings})[0] & set(embeddings)]
    found, marked = reach(traced.output.grad_fn, {**linear_stops, **last}, norm_marks)
    output_is_stream = LAST in found
    if output_is_stream:
        after |= marked
    return ModelFacts(token if not projections and token in embeddings else "",
                      tuple(e for e in embeddings if e != token), ordered(before),
                      projections[0] if projections else "", ordered(after), ordered(readers), output_is_stream,
                      parameters, unplaced, ordered(side))
