"""Timing on the GPU: a call's milliseconds with CUDA events, as a replayed CUDA graph, and one linear's cost.

The deployed model runs under CUDA graphs or ``torch.compile``, so a kernel's cost is measured without the
host's per-call work: the calls are captured in a CUDA graph and the graph is replayed between two CUDA
events; the median of a few replays counts. :class:`LinearCosts` measures one linear shape at one token
count on one kernel (the cost table of :mod:`.policy`): it cycles through enough copies of the weight that
they do not fit in the L2 cache together (as in a model, where every layer's weights are read once per
step), and captures one call on each copy per replay.

Everything here needs a CUDA GPU.
"""
from __future__ import annotations

import math
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from ..sparsity.masks import nm_mask
from . import cusparselt
from .format import compress as compress_values

__all__ = ["LinearCosts", "capture", "event_ms"]

L2_FLUSH_BYTES = 256 * 2**20  # weights cycled per replay: more than any GPU's L2 cache holds
MAX_COPIES = 32


def event_ms(fn: Callable[[], object], repeats: int = 5, warmup: int = 2, calls: int = 1) -> float:
    """Median milliseconds per call of ``fn`` over ``repeats`` timings of ``calls`` back-to-back calls,
    timed with CUDA events after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def capture(fn: Callable[[], object], warmup: int = 2) -> torch.cuda.CUDAGraph:
    """``fn`` captured in a CUDA graph, after ``warmup`` calls on a side stream (which compile kernels and
    fill caches, as capture requires); replay with ``graph.replay()``."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def _line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


class LinearCosts:
    """A :data:`permsparse.deploy.policy.Measure`: milliseconds per call of one linear shape on one kernel,
    as a replayed CUDA graph over L2-cold weights; None when the kernel cannot run that shape (the reason
    is kept in ``failures``). Random 2:4 weights are made once per shape and dtype."""

    def __init__(self, device: torch.device | str = "cuda", repeats: int = 5, seed: int = 0):
        self.device, self.repeats, self.seed = torch.device(device), repeats, seed
        self.failures: dict[tuple, str] = {}
        self._weights: dict[tuple, list[torch.Tensor]] = {}

    def weights(self, out: int, width: int, dtype: torch.dtype) -> list[torch.Tensor]:
        key = (out, width, dtype)
        if key not in self._weights:
            gen = torch.Generator(device=self.device).manual_seed(self.seed)
            copies = min(MAX_COPIES, max(1, math.ceil(L2_FLUSH_BYTES / (out * width * dtype.itemsize))))
            made = []
            for _ in range(copies):
                weight = torch.randn(out, width, generator=gen, device=self.device, dtype=dtype) * width ** -0.5
                made.append(weight * nm_mask(weight.abs().float(), 2, 4))
            self._weights[key] = made
        return self._weights[key]

    def __call__(self, out: int, width: int, tokens: int, dtype: str, kernel: str) -> float | None:
        key = (out, width, tokens, dtype, kernel)
        try:
            calls = self._calls(out, width, tokens, _dtype(dtype), kernel)
            run = lambda: [call() for call in calls]  # noqa: E731
            try:
                replay = capture(run).replay
            except RuntimeError as err:  # not capturable: timed eagerly, host work included
                self.failures[key] = f"timed without a CUDA graph: {_line(err)}"
                replay = run
            return event_ms(replay, self.repeats) / len(calls)
        except Exception as err:  # noqa: BLE001 - a kernel that cannot run this shape (Triton raises its own errors)
            self.failures[key] = _line(err)
            return None

    def _calls(self, out: int, width: int, tokens: int, dtype: torch.dtype, kernel: str) -> list[Callable]:
        weights = self.weights(out, width, dtype)
        x = torch.randn(tokens, width, device=self.device, dtype=dtype)
        if kernel == "dense":
            return [lambda w=w: F.linear(x, w) for w in weights]
        if kernel == "cusparselt":
            problem = cusparselt.cusparselt_problem(out, width, dtype)
            if problem:
                raise ValueError(problem)
            packed = [cusparselt.compress(w) for w in weights]
            alg_id, _ = cusparselt.search_alg_id(packed[0], x)
            return [lambda p=p: cusparselt.matmul(x, p, None, alg_id) for p in packed]
        if kernel == "triton":
            from .triton_decode import matmul24

            compressed = [compress_values(w) for w in weights]
            return [lambda v=v, m=m: matmul24(x, v, m) for v, m in compressed]
        raise ValueError(f"unknown kernel {kernel!r}")

    def release(self) -> None:
        """Free the random weights (the costs measured stay with the caller)."""
        self._weights.clear()
