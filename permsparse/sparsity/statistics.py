"""Block-by-block calibration: capture the first block's inputs, collect input statistics, run blocks.

Only one block's activations live at a time, so memory is one block plus ``nsamples x seqlen x d``
hidden states, never the whole model's activations.
"""
from __future__ import annotations

import inspect
import os
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..run import distributed
from ..discover.adapters import Adapter, linear_weight
from ..discover import NotUnderstood, model_inputs


class BlockArguments(dict):
    """The keyword arguments every block receives besides its hidden states (rotary embeddings, masks,
    positions), captured for one window. Those that hold one slice per window of a batch (an ALiBi bias of
    shape ``(batch * heads, ...)``, a mask a model checks against the batch) are repeated to the batch a
    call runs: ``block(x, **arguments.batch(len(x)))``; the others broadcast as captured.

    Arguments made from each window's own tokens (Gemma's per-layer inputs, a slice of a second embedding for
    every block; the embeddings Zamba2 hands every block beside the stream) are ``windowed``: captured for every calibration window and every block, held along their
    window axis; :meth:`for_block` gives a block's, :meth:`windows` those of some windows, and a call on
    windows ``start .. start + size`` of them takes ``arguments.batch(size, start)``."""

    def __init__(self, values: dict, per_window: dict[str, int] | None = None, windowed: dict[str, int] | None = None,
                 blocks: list[dict[str, torch.Tensor]] | None = None):
        super().__init__(values)
        self.per_window = per_window or {}  # name -> the axis that grows with the batch
        self.windowed = windowed or {}  # name -> the axis holding one slice per calibration window
        self.blocks = blocks or []  # per block: name -> that block's windowed argument, every window

    def batch(self, size: int, start: int = 0) -> dict:
        out = dict(self)
        for name, axis in self.windowed.items():
            out[name] = self[name].narrow(axis, start, size)
        if self.per_window and size > 1:
            out.update({name: torch.cat([self[name]] * size, dim=axis) for name, axis in self.per_window.items()})
        return out if self.windowed or (self.per_window and size > 1) else self

    def for_block(self, i: int) -> "BlockArguments":
        if not self.windowed:
            return self
        return BlockArguments({**self, **self.blocks[i]}, self.per_window, self.windowed, self.blocks)

    def windows(self, index: slice | torch.Tensor) -> "BlockArguments":
        if not self.windowed:
            return self
        def chosen(values: dict) -> dict:
            return {name: (values[name][(slice(None),) * axis + (index,)] if isinstance(index, slice)
                           else values[name].index_select(axis, index.to(values[name].device)))
                    for name, axis in self.windowed.items()}

        return BlockArguments({**self, **chosen(self)}, self.per_window, self.windowed,
                              [chosen(block) for block in self.blocks])


def batch_arguments(kwargs: dict, size: int, start: int = 0) -> dict:
    """``kwargs`` for a call on ``size`` windows starting at window ``start`` of those they hold (see
    :class:`BlockArguments`; a plain dict as it is)."""
    return kwargs.batch(size, start) if isinstance(kwargs, BlockArguments) else kwargs


def block_arguments(kwargs: dict, i: int) -> dict:
    """The arguments of block ``i`` (see :meth:`BlockArguments.for_block`; a plain dict as it is)."""
    return kwargs.for_block(i) if isinstance(kwargs, BlockArguments) else kwargs


def window_arguments(kwargs: dict, index: slice | torch.Tensor) -> dict:
    """The arguments of some windows (see :meth:`BlockArguments.windows`; a plain dict as it is)."""
    return kwargs.windows(index) if isinstance(kwargs, BlockArguments) else kwargs


def _window_axis(one: torch.Tensor, two: torch.Tensor) -> int | None:
    """The axis along which ``two`` (captured for two windows) is ``one`` (for one) twice, or None."""
    for axis in range(one.dim()):
        if two.shape[axis] == 2 * one.shape[axis] and torch.equal(two, torch.cat([one, one], dim=axis)):
            return axis
    return None


class _Captured(Exception):
    """Raised by the first block's pre-hook to stop the forward once its inputs are recorded."""


@dataclass
class InputStats:
    """Statistics of one linear input over the calibration tokens.

    ``sq_sum[j] = sum_t x_tj^2`` gives Wanda's ``||X_j||_2``; ``gram = X^T X`` (optional) gives the
    exact output error of a pruned weight, ``sum_r d_r H d_r^T``. ``drift = (X_dense - X)^T X``
    (optional, :func:`collect_drift`), where ``X`` comes from the pruned model and ``X_dense`` from the
    dense one, turns that into the error against the dense model's outputs, which is what the pruned
    model is judged on: ``||X_dense W^T - X (W - d)^T||^2 = const + 2 <W drift, d> + sum_r d_r H d_r^T``.
    """

    sq_sum: torch.Tensor
    gram: torch.Tensor | None
    tokens: int
    drift: torch.Tensor | None = None

    @property
    def act_norm(self) -> torch.Tensor:
        return self.sq_sum.sqrt().float()


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, adapter: Adapter, samples: torch.Tensor, batch_size: int = 8
) -> tuple[torch.Tensor, BlockArguments]:
    """Hidden states entering block 0 for every sample (token ids, or preprocessed images), and the keyword
    arguments blocks receive.

    Other arguments (rotary embeddings, causal mask, positions), positional ones included, are bound
    to their parameter names. They are the same for every window of one length, so they are captured
    once, with batch 1, and broadcast over larger batches later; one that a model builds per window of the
    batch is captured with two windows too, to be repeated to each batch (:class:`BlockArguments`). One made
    from each window's own tokens (per-layer inputs, different in every block; hidden states handed to every
    block) is captured for every window and block. Any other argument that differs between windows (positions
    or masks), or grows with the batch otherwise, stops the run in one line.
    """
    first = adapter.blocks(model)[0]
    signature = inspect.signature(first.forward)
    calls: list[dict] = []

    def hook(_module, args, kwargs):
        bound = signature.bind_partial(*args, **kwargs).arguments
        bound.update(bound.pop("kwargs", {}))
        calls.append(bound)
        raise _Captured

    def call(batch: torch.Tensor) -> dict:
        try:
            model(**model_inputs(model, batch))
        except _Captured:
            pass
        return calls.pop()

    handle = first.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)  # before an offloaded block moves
    try:
        hidden_name = next(iter(signature.parameters))
        hidden = [call(samples[i : i + batch_size])[hidden_name] for i in range(0, samples.shape[0], batch_size)]
        kwargs, last = call(samples[:1]), call(samples[-1:])
        pair = call(samples[:2]) if len(samples) > 1 else kwargs
    finally:
        handle.remove()
    drop = {hidden_name, "cache", "past_key_values", "layer_past", "use_cache"}
    per_window, windowed = {}, {}
    for name, value in kwargs.items():
        if name in drop:
            continue
        axis = _own_window_axis(value, pair[name]) if len(samples) > 1 else None
        if not _same(value, last[name]) and axis is not None:
            windowed[name] = axis
            continue
        if not _same(value, last[name]):
            raise ValueError(f"the blocks of {type(model).__name__} receive a {name} that differs between calibration "
                             "windows (with images: positions or attention masks that depend on where the images "
                             "are); calibrate its language tower on text")
        other = pair[name]
        if isinstance(value, torch.Tensor) and isinstance(other, torch.Tensor) and value.shape != other.shape:
            axis = _window_axis(value, other)
            if axis is None:
                raise ValueError(f"the blocks of {type(model).__name__} receive a {name} of shape "
                                 f"{tuple(value.shape)} for one window and {tuple(other.shape)} for two, which is not "
                                 "the first repeated: its windows cannot be replayed block by block")
            per_window[name] = axis
    blocks = _every_block(model, adapter, samples, batch_size, windowed) if windowed else []
    shared = [name for name in windowed if all(torch.equal(block[name], blocks[0][name]) for block in blocks[1:])]
    states = [name for name in shared if blocks[0][name].shape[1:] == hidden[0].shape[1:]]
    moving = [name for name in shared if name not in states]
    if moving:  # positions or masks that move with each window's content, the same in every block
        raise ValueError(f"the blocks of {type(model).__name__} receive a {moving[0]} that differs between calibration "
                         "windows (with images: positions or attention masks that depend on where the images "
                         "are); calibrate its language tower on text")
    for block in blocks[1:]:  # the embeddings every block reads beside the stream (Zamba2): held once
        block.update({name: blocks[0][name] for name in states})
    values = {k: v for k, v in kwargs.items() if k not in drop} | (blocks[0] if blocks else {})
    return torch.cat(hidden), BlockArguments(values, per_window, windowed, blocks)


def _own_window_axis(one, two) -> int | None:
    """The axis along which ``two`` (captured for windows 0 and 1) holds ``one`` (for window 0) and another
    window's slice beside it: an argument made from each window's own tokens; None otherwise."""
    if not (isinstance(one, torch.Tensor) and isinstance(two, torch.Tensor)) or one.dim() != two.dim():
        return None
    for axis in range(one.dim()):
        if (one.shape[axis] and two.shape[axis] == 2 * one.shape[axis]
                and torch.equal(two.narrow(axis, 0, one.shape[axis]), one)):
            return axis
    return None


def _every_block(model: nn.Module, adapter: Adapter, samples: torch.Tensor, batch_size: int,
                 windowed: dict[str, int]) -> list[dict[str, torch.Tensor]]:
    """The ``windowed`` arguments of every block, for every sample: one dense pass of the model up to its last
    block, each block's arguments recorded as it is called."""
    blocks = adapter.blocks(model)
    names = [list(inspect.signature(block.forward).parameters) for block in blocks]
    seen: list[dict[str, list[torch.Tensor]]] = [{name: [] for name in windowed} for _ in blocks]

    def hook(i):
        def record(_module, args, kwargs):
            bound = dict(zip(names[i], args)) | kwargs
            for name in windowed:
                seen[i][name].append(bound[name].detach())
            if i == len(blocks) - 1:
                raise _Captured
        return record

    handles = [block.register_forward_pre_hook(hook(i), with_kwargs=True, prepend=True)
               for i, block in enumerate(blocks)]
    try:
        for start in range(0, samples.shape[0], batch_size):
            try:
                model(**model_inputs(model, samples[start:start + batch_size]))
            except _Captured:
                pass
    finally:
        for handle in handles:
            handle.remove()
    return [{name: torch.cat(parts, dim=windowed[name]) for name, parts in block.items()} for block in seen]


def _same(a, b) -> bool:
    """Whether two block arguments are equal (tensors, or tuples of them, elementwise)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return True  # other arguments (flags, caches, modules) are not compared


def block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


_PACKAGE = str(Path(__file__).resolve().parents[1]) + os.sep


def _call_alone(block: nn.Module, inputs: torch.Tensor, kwargs: dict):
    """``block`` on ``inputs`` with the arguments the model passed it. A family's block that fails when run
    without the rest of its model (state it expects the model to have set, an index into a map the model
    keeps) is named in one line; a failure inside permsparse itself stays a traceback."""
    try:
        return block(inputs, **kwargs)
    except Exception as error:  # noqa: BLE001 - classified by where it was raised
        frames = [frame.filename for frame in traceback.extract_tb(error.__traceback__)][1:]
        if not frames or any(name.startswith(_PACKAGE) for name in frames):
            raise
        raise NotUnderstood(f"{type(block).__name__} fails when run on its own with the arguments the model "
                            f"passed it ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} "
                            f"in {os.path.basename(frames[-1])})") from error


@torch.no_grad()
def run_block(block: nn.Module, inputs: torch.Tensor, kwargs: dict, batch_size: int = 8) -> torch.Tensor:
    """The block's outputs for all inputs, in mini-batches."""
    return torch.cat(
        [block_output(_call_alone(block, inputs[i : i + batch_size], batch_arguments(kwargs, len(inputs[i : i + batch_size]), i)))
         for i in range(0, inputs.shape[0], batch_size)]
    )


@contextmanager
def _input_hooks(block: nn.Module, readers: dict[str, str], make_hook):
    """Forward pre-hooks ``make_hook(key, linear_name)`` on each named linear of ``block``, removed on exit."""
    handles = [block.get_submodule(name).register_forward_pre_hook(make_hook(key, name)) for key, name in readers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def collect_input_stats(
    block: nn.Module,
    readers: dict[str, str],
    inputs: torch.Tensor,
    kwargs: dict,
    want_gram: bool,
    block_name: str,
    batch_size: int = 8,
) -> tuple[dict[str, InputStats], torch.Tensor]:
    """Run the (dense) block once, recording statistics of each named linear's input.

    ``readers`` maps a key to the one linear that is hooked for it (linears that read the same tensor
    share one key). Returns the statistics and the block's outputs. Non-finite activations raise an
    error naming the layer. A linear that no token reaches (an expert its router never chose) gets the
    statistics of unit, uncorrelated inputs with ``tokens == 0``: Wanda then scores it by magnitude.
    """
    stats: dict[str, InputStats] = {}
    for key, name in readers.items():  # every key on every process, so the sums below match up
        weight = linear_weight(block.get_submodule(name))
        d, device = weight.shape[1], weight.device
        stats[key] = InputStats(torch.zeros(d, dtype=torch.float64, device=device),
                                torch.zeros(d, d, dtype=torch.float64, device=device) if want_gram else None, 0)

    def make_hook(key: str, linear_name: str):
        def hook(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            squares = x.double().square_().sum(0)  # finite exactly when x is: no float32 square overflows a double
            if not torch.isfinite(squares).all():
                raise FloatingPointError(f"non-finite activations entering {block_name}.{linear_name}")
            s = stats[key]
            s.sq_sum += squares
            if s.gram is not None:
                s.gram += (x.T @ x).double()
            s.tokens += x.shape[0]

        return hook

    with _input_hooks(block, readers, make_hook):
        outputs = run_block(block, inputs, kwargs, batch_size)
    for s in stats.values():  # with several processes: the sums over every rank's windows
        distributed.sum_(s.sq_sum)
        s.tokens = int(distributed.sum_(torch.tensor(s.tokens, dtype=torch.float64, device=s.sq_sum.device)))
        if s.gram is not None:
            s.gram = distributed.sum_(s.gram).float()
        if not s.tokens:
            s.sq_sum.fill_(1.0)
            if s.gram is not None:
                s.gram = torch.eye(len(s.sq_sum), device=s.gram.device)
    return stats, outputs


@torch.no_grad()
def collect_drift(
    block: nn.Module, readers: dict[str, str], inputs: torch.Tensor, reference: torch.Tensor, kwargs: dict,
    stats: dict[str, InputStats], batch_size: int = 8,
) -> torch.Tensor:
    """Fill ``stats[key].drift`` with ``(X_dense - X)^T X`` for each hooked linear of the (still dense)
    block, where ``X`` is its input when the block reads ``inputs`` (the pruned model's hidden states)
    and ``X_dense`` when it reads ``reference`` (the dense model's); return the block's outputs on
    ``reference``, the next block's reference. Accumulated batch by batch, so it holds one batch of
    activations per linear, never all tokens.
    """
    seen: dict[str, torch.Tensor] = {}

    def make_hook(key: str, _linear_name: str):
        def hook(_module, args):
            seen[key] = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        return hook

    outputs = []
    with _input_hooks(block, readers, make_hook):
        for i in range(0, inputs.shape[0], batch_size):
            arguments = batch_arguments(kwargs, len(inputs[i : i + batch_size]), i)
            block(inputs[i : i + batch_size], **arguments)
            pruned = dict(seen)
            outputs.append(block_output(block(reference[i : i + batch_size], **arguments)))
            for key, x in pruned.items():
                s = stats[key]
                if s.drift is None:
                    s.drift = x.new_zeros(x.shape[1], x.shape[1])
                s.drift += (seen[key] - x).T @ x
    for s in stats.values():
        if s.drift is not None:
            s.drift = distributed.sum_(s.drift).float()
    return torch.cat(outputs)
