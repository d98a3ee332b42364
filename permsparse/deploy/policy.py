"""Which linears run as 2:4, and on which kernels: decided per linear shape from measured costs.

A cost table maps ``(out, in, tokens, dtype, kernel)`` to milliseconds per call, ``kernel`` one of
:data:`KERNELS` (``dense``: ``F.linear``; ``cusparselt`` and ``triton``: the 2:4 kernels). It is measured on
the GPU (:mod:`.costs`) or read from the JSON that ``permsparse speed`` writes. A workload says how many
calls of each token count to expect (a 2048-token prompt and 128 generated tokens at batch 1:
``{2048: 1, 1: 128}``).

Each storage of :mod:`.linear` serves calls with the kernels it can feed: ``cusparselt`` and ``triton``
one each, ``cusparselt+triton`` the Triton kernel up to a token threshold and cuSPARSELt above it (the
threshold that costs least). A linear's cost under a storage is the sum over the workload of calls times
milliseconds per call. The cheapest storage wins if it is strictly cheaper than dense; otherwise – a tie,
a 2:4 kernel slower than dense, a cost that is unknown and cannot be measured – the linear stays dense
(in storage order, so its mask still holds), with the reason. Among equally cheap storages the one with
fewer bytes (the single storages) wins. The predicted speed-up is the workload's dense time over its
chosen time, summed over the linears.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

__all__ = ["DEFAULT_WORKLOAD", "KERNELS", "STORAGE_KERNELS", "Choice", "Plan", "choose", "cost_entries", "plan",
           "read_costs", "write_costs"]

KERNELS = ("dense", "cusparselt", "triton")
STORAGE_KERNELS = {"cusparselt": ("cusparselt",), "triton": ("triton",), "cusparselt+triton": ("cusparselt", "triton")}
DEFAULT_WORKLOAD = {2048: 1.0, 1: 128.0}  # calls per token count: one 2048-token prompt, 128 generated tokens

CostKey = tuple[int, int, int, str, str]  # (out, in, tokens, dtype, kernel)
Measure = Callable[[int, int, int, str, str], "float | None"]


@dataclass
class Choice:
    """How one linear shape runs: ``storage`` (``dense`` or one of :data:`STORAGE_KERNELS`), the largest token
    count sent to the Triton kernel (``cusparselt+triton``; 0 otherwise), milliseconds per call by token
    count dense and as chosen, and why."""

    storage: str
    decode_max: int
    dense_ms: dict[int, float]
    ms: dict[int, float]
    reason: str

    def total(self, workload: dict[int, float], dense: bool = False) -> float:
        costs = self.dense_ms if dense else self.ms
        return sum(calls * costs[tokens] for tokens, calls in workload.items())


@dataclass
class Plan:
    """The choice for every linear (by full name), and what the workload predicts of it."""

    workload: dict[int, float]
    choices: dict[str, Choice] = field(default_factory=dict)

    @property
    def converted(self) -> list[str]:
        return [name for name, choice in self.choices.items() if choice.storage != "dense"]

    @property
    def not_converted(self) -> dict[str, str]:
        return {name: choice.reason for name, choice in self.choices.items() if choice.storage == "dense"}

    def _timed(self) -> list[Choice]:
        return [c for c in self.choices.values() if c.ms and set(c.ms) >= set(self.workload)]

    def predicted_speedup(self) -> float | None:
        """Dense time over chosen time for the workload, over the linears whose costs are known."""
        timed = self._timed()
        chosen = sum(c.total(self.workload) for c in timed)
        return sum(c.total(self.workload, dense=True) for c in timed) / chosen if chosen else None

    def speedup_by_tokens(self) -> dict[int, float]:
        """The same per token count: what one call of that many tokens gains over all the linears."""
        timed = self._timed()
        return {tokens: sum(c.dense_ms[tokens] for c in timed) / sum(c.ms[tokens] for c in timed)
                for tokens in sorted(self.workload) if timed and sum(c.ms[tokens] for c in timed) > 0}


def _fmt(ms: float) -> str:
    return f"{ms:.4g} ms"


def choose(out: int, width: int, dtype: str, workload: dict[int, float], costs: dict[CostKey, float],
           storages: dict[str, str], measure: Measure | None = None) -> Choice:
    """The choice for one linear shape. ``storages`` maps each storage to "" where it can hold this shape
    here, or to why it cannot; a cost missing from ``costs`` is measured (and added) when ``measure`` is
    given, else that kernel is unavailable."""
    if not workload or any(calls <= 0 for calls in workload.values()):
        raise ValueError(f"a workload maps token counts to positive call counts; got {workload}")
    unknown = set(storages) - set(STORAGE_KERNELS)
    if unknown:
        raise ValueError(f"unknown storage {sorted(unknown)[0]!r}; choose from {', '.join(STORAGE_KERNELS)}")
    missing: list[str] = []
    failed: set[CostKey] = set()  # measured, and could not run

    def cost(tokens: int, kernel: str) -> float | None:
        key = (out, width, tokens, dtype, kernel)
        if key not in costs and key not in failed and measure is not None:
            ms = measure(*key)
            if ms is None:
                failed.add(key)
            else:
                costs[key] = ms
        if key not in costs:
            missing.append(f"{kernel} at {tokens} tokens")
        return costs.get(key)

    tokens = sorted(workload)
    dense = {t: cost(t, "dense") for t in tokens}
    if None in dense.values():
        return Choice("dense", 0, {}, {}, f"no cost known for {', '.join(missing)}")
    dense_total = sum(workload[t] * dense[t] for t in tokens)
    best = Choice("dense", 0, dense, dense, "")
    best_total, reasons = dense_total, []
    for storage, kernels in STORAGE_KERNELS.items():
        if storage not in storages:
            continue
        if storages[storage]:
            reasons.append(f"{storage}: {storages[storage]}")
            continue
        missing.clear()
        per_kernel = {kernel: {t: cost(t, kernel) for t in tokens} for kernel in kernels}
        if missing:
            reasons.append(f"{storage}: no cost known for {', '.join(missing)}")
            continue
        if len(kernels) == 1:
            ms, decode_max = per_kernel[kernels[0]], 0
        else:  # Triton up to a threshold, cuSPARSELt above: the cheapest threshold that uses both
            options = []
            for i in range(1, len(tokens)):
                ms = {t: per_kernel["triton" if t <= tokens[i - 1] else "cusparselt"][t] for t in tokens}
                options.append((sum(workload[t] * ms[t] for t in tokens), tokens[i - 1], ms))
            if not options:
                reasons.append(f"{storage}: one token count only, a single kernel serves it")
                continue
            _, decode_max, ms = min(options, key=lambda option: option[0])
        total = sum(workload[t] * ms[t] for t in tokens)
        reasons.append(f"{storage} {_fmt(total)}")
        if total < best_total:
            best, best_total = Choice(storage, decode_max, dense, ms, ""), total
    if best.storage == "dense":
        tried = "; ".join(reasons) if reasons else "no 2:4 storage available"
        best.reason = f"2:4 is not faster for the workload: dense {_fmt(dense_total)} vs {tried}"
    else:
        best.reason = f"{dense_total / best_total:.2f}x faster than dense ({_fmt(dense_total)} -> {_fmt(best_total)})"
    return best


def plan(shapes: dict[str, tuple[int, int]], dtype: str, workload: dict[int, float], costs: dict[CostKey, float],
         storages: Callable[[int, int], dict[str, str]], measure: Measure | None = None) -> Plan:
    """The choice for every named linear of shape ``(out, in)``, decided once per shape; ``storages(out, in)``
    says which storages can hold that shape (see :func:`choose`)."""
    result, decided = Plan(dict(workload)), {}
    for name, shape in shapes.items():
        if shape not in decided:
            decided[shape] = choose(*shape, dtype, workload, costs, storages(*shape), measure)
        result.choices[name] = decided[shape]
    return result


def cost_entries(costs: dict[CostKey, float]) -> list[dict]:
    """A cost table as JSON-ready entries, sorted."""
    return [{"out": o, "in": i, "tokens": t, "dtype": d, "kernel": k, "ms": ms}
            for (o, i, t, d, k), ms in sorted(costs.items())]


def write_costs(costs: dict[CostKey, float], path: str | Path, machine: dict | None = None) -> Path:
    """Write a cost table as JSON (its entries, with the machine they were measured on)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine or {}, "costs": cost_entries(costs)}, indent=1))
    return path


def read_costs(path: str | Path) -> dict[CostKey, float]:
    """A cost table written by :func:`write_costs` (or the ``costs`` of ``permsparse speed``'s JSON)."""
    data = json.loads(Path(path).read_text())
    entries = data.get("costs") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path} holds no cost table (a 'costs' list of out/in/tokens/dtype/kernel/ms entries)")
    table = {}
    for entry in entries:
        try:
            key = (int(entry["out"]), int(entry["in"]), int(entry["tokens"]), str(entry["dtype"]), str(entry["kernel"]))
            table[key] = float(entry["ms"])
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: malformed cost entry {entry!r} ({type(err).__name__}: {err})") from None
        if key[4] not in KERNELS:
            raise ValueError(f"{path}: unknown kernel {key[4]!r} in {entry!r}; kernels are {', '.join(KERNELS)}")
    return table
