"""Checking a checkpoint: the digest of every tensor, the sparsity pattern of every pruned linear and the
recorded logits. The tolerance of the logits check is ours (by the weights' dtype) or the caller's,
never one read from the checked record."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..discover.adapters import linear_weight
from ..discover import experts_as_linears
from ..sparsity.masks import nm_violation
from .digest import check_weight_files, compare_digests, record_digest, tensor_digests
from .load import load
from .record import read_record
from .reference import TOLERANCE, compare_reference, model_logits, reference_input


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
    digest: str = ""  # of the record (checkpoint.digest.record_digest)
    tensors: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def lines(self) -> list[str]:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(self.layouts.items()))
        good = sum(1 for v in self.layers.values() if v == "ok")
        out = [f"{self.folder}: {self.format} checkpoint, {self.pattern}, {len(self.layers)} pruned linears ({counts}); "
               f"{good} pass the pattern check", f"tensors: {self.tensors}", f"reference logits: {self.logits}",
               f"record digest: {self.digest}"]
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


def check_checkpoint(folder: str | Path, *, device: str = "cpu", tolerance: float | None = None,
                     expect: str | None = None) -> CheckReport:
    """Verify a permsparse checkpoint: every tensor against its digest recorded at export, the pattern of
    every pruned linear in its recorded layout, and the logits of the recorded input (within ``tolerance``,
    by default ours for the weights' dtype); with ``expect``, that the record's digest is that one. Never
    raises for a failed check (see :meth:`CheckReport.raise_for_failure`); raises FileNotFoundError for a
    folder that is no checkpoint, and ValueError for pickled, truncated or corrupt weight files.
    """
    folder = Path(folder)
    record = read_record(folder)
    check_weight_files(folder)
    report = CheckReport(str(folder), record.export, record.config.pattern, digest=record_digest(folder))
    if expect is not None and expect.strip().lower() != report.digest:
        report.failures.append(f"record digest {report.digest} is not the expected {expect.strip()}")
    found = tensor_digests(folder)
    mismatched = compare_digests(record.tensors, found)
    report.failures += mismatched
    report.tensors = (f"{len(found)} match the digests recorded at export" if not mismatched
                      else f"{len(mismatched)} of {len(found | record.tensors)} do not match the digests recorded")
    if not record.tensors:
        report.failures.append("the record holds no tensor digests: the weights cannot be verified")
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
    if tolerance is None:
        tolerance = TOLERANCE.get(next(model.parameters()).dtype, 1e-4)
    ok, report.logits = compare_reference(logits, record.reference, tolerance)
    if not ok:
        report.failures.append(f"logits: do not match the recorded reference: {report.logits}")
    return report
