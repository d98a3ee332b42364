"""Checking a checkpoint: the digest of every tensor, the sparsity pattern of every pruned linear and the
recorded logits; for a compressed checkpoint also its stored form (metadata, positions, scales) and every
pruned linear's expanded weight against its digest recorded at export. The tolerance of the logits check is ours (by the weights' dtype) or the caller's,
never one read from the checked record."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..discover.adapters import linear_weight
from ..discover import experts_as_linears
from ..sparsity.masks import nm_violation
from ..serial import RecordError
from .compressed import read_stored, stored_digest, stored_from_tensors
from .digest import check_weight_files, compare_digests, record_digest, tensor_digests
from .load import load
from .record import CheckpointRecord, read_record
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
    storage: str = ""
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
        if self.storage:
            out.insert(1, f"storage: {self.storage}")
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


def compressed_failures(folder: Path, record: CheckpointRecord) -> list[str]:
    """What is wrong with a compressed checkpoint's stored linears: malformed metadata, a pruned linear not
    stored, positions naming more than N entries of a group (or one twice), scales not finite, an expanded
    weight whose digest differs from the one recorded at export."""
    from safetensors import SafetensorError, safe_open

    try:
        specs, _, files = read_stored(folder)
    except (RecordError, FileNotFoundError, SafetensorError, OSError) as err:
        return [f"compressed metadata: {err}"]
    failures = [f"{name}: pruned linear not stored compressed" for name in record.layouts if name not in specs]
    digests = record.storage.expanded_sha256 if record.storage is not None else {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            for name, spec in specs.items():
                if f"{name}.weight.values" not in keys:
                    continue
                try:
                    stored = stored_from_tensors(name, spec, lambda key: f.get_tensor(key) if key in keys else None)
                    problem = stored.problem()
                except (RecordError, ValueError, TypeError) as err:
                    problem = str(err)
                if not problem and digests.get(name) != stored_digest(stored.expand()):
                    problem = "its expanded weight differs from the one recorded at export (SHA-256)"
                if problem:
                    failures.append(f"{name}: {problem}")
    return failures


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
    storage = record.storage
    if storage is not None:
        quant = "" if storage.quantization == "none" else (
            f", {storage.quantization} ({storage.method}, group {storage.group})")
        report.storage = (f"{storage.format} {storage.dtype}{quant}; weights {storage.weights_bytes} bytes, pruned linears "
                          f"{storage.pruned_bytes} bytes = {storage.pruned_ratio:.4f} x their dense bf16 bytes")
    if record.export == "compressed":
        report.failures += compressed_failures(folder, record)
        if report.failures:  # the model cannot be trusted to load as recorded: report the stored form only
            report.layers = {name: "not checked" for name in record.layouts}
            report.logits = "not checked (the stored form failed)"
            return report
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
