"""Checking a checkpoint: the sparsity pattern of every pruned linear and the recorded logits."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..discover.adapters import linear_weight
from ..discover import experts_as_linears
from ..sparsity.masks import nm_violation
from .load import load
from .record import read_record
from .reference import compare_reference, model_logits, reference_input


class CheckFailed(ValueError):
    """A checkpoint failed :func:`check_checkpoint`; the message names every failing layer."""


@dataclass
class CheckReport:
    """What :func:`check_checkpoint` found. ``layers``: name -> "ok" or the reason it failed."""

    folder: str
    format: str
    pattern: str
    layers: dict[str, str] = field(default_factory=dict)
    layouts: dict[str, int] = field(default_factory=dict)
    logits: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(self.layouts.items()))
        good = sum(1 for v in self.layers.values() if v == "ok")
        out = [f"{self.folder}: {self.format} checkpoint, {self.pattern}, {len(self.layers)} pruned linears ({counts}); "
               f"{good} pass the pattern check", f"reference logits: {self.logits}"]
        out += [f"FAIL {f}" for f in self.failures]
        out.append("OK" if self.ok else f"FAILED ({len(self.failures)} problems)")
        return out

    def raise_for_failure(self) -> None:
        if self.failures:
            raise CheckFailed(f"{self.folder} failed the check: " + "; ".join(self.failures))


def _problem(weight: torch.Tensor, layout: str, perm: list[int] | None, config) -> str:
    if layout == "unstructured":
        keep = int(round(weight.shape[1] * config.density))
        most = int((weight != 0).sum(1).max())
        return f"a row keeps {most} weights, more than {keep}" if most > keep else ""
    n, m = config.nm
    if layout == "masked":
        if len(perm) != weight.shape[1]:
            return f"recorded permutation has {len(perm)} entries, the layer {weight.shape[1]} inputs"
        problem = nm_violation(weight[:, torch.as_tensor(perm)], n, m)
        return f"not {n}:{m} through its permutation (masked layout): {problem}" if problem else ""
    problem = nm_violation(weight, n, m)
    return f"not {n}:{m} in storage order ({layout} layout): {problem}" if problem else ""


def check_checkpoint(folder: str | Path, *, device: str = "cpu", tolerance: float | None = None) -> CheckReport:
    """Verify a permsparse checkpoint: the pattern of every pruned linear, in its recorded layout, and
    the logits of the recorded input. Never raises for a failed check (see
    :meth:`CheckReport.raise_for_failure`); raises FileNotFoundError for a folder that is no checkpoint.
    """
    folder = Path(folder)
    record = read_record(folder)
    report = CheckReport(str(folder), record.export, record.config.pattern)
    model = load(folder, device=device)
    with experts_as_linears(model):  # packed experts are checked as the linears they were pruned as
        for name, entry in record.layouts.items():
            report.layouts[entry.layout] = report.layouts.get(entry.layout, 0) + 1
            try:
                module = model.get_submodule(name)
            except AttributeError:
                problem = "no such linear in the checkpoint"
            else:
                problem = _problem(linear_weight(module).detach().cpu(), entry.layout, entry.perm, record.config)
            report.layers[name] = problem or "ok"
            if problem:
                report.failures.append(f"{name}: {problem}")
    logits = model_logits(model, reference_input(record.reference, model))
    ok, report.logits = compare_reference(logits, record.reference, tolerance)
    if not ok:
        report.failures.append(f"logits: do not match the recorded reference: {report.logits}")
    return report
