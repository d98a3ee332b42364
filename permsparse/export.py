"""Writing and checking pruned checkpoints: a plain Hugging Face folder plus ``permsparse.json``.

Two formats (method.md §1, §4):

- ``masked``: every pruned linear stores ``W * unpermute(mask)`` in the original column order. It is
  N:M only *through* its permutation ``p`` (``W[:, p]`` is N:M). ``from_pretrained(DIR)`` loads it anywhere.
- ``folded``: every permutation that folds exactly into its producers (``folding.py``) is folded, so
  those linears are N:M **in storage order** (what 2:4 GPU kernels need) and the model computes the same
  function. A linear that cannot fold (a residual-stream reader without a global hidden permutation, an
  attention-output permutation crossing heads) is either left in the masked layout (``fallback="masked"``,
  the default; the folder stays a plain, exact HF checkpoint) or stored permuted with the permutation
  recorded (``fallback="gather"``): then only :func:`permsparse.deploy.load` gives correct outputs, since
  it re-attaches the runtime input gather ``x[..., p]``.

``permsparse.json`` holds the pruning report (``config``, ``layers``, ``permutations``), the ``format``,
per-layer ``layouts`` (folded exports), a ``fold`` summary, ``loading`` (whether plain ``from_pretrained``
is exact) and ``reference``: the logits of a fixed, seeded token batch recorded from the in-memory model
at export, which :func:`check_checkpoint` compares against. Everything is written into ``DIR.partial``
and renamed at the end: a folder named ``DIR`` is always complete.
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from .adapters import adapter_for, linear_weight
from .folding import fold_permutations, permutations_by_linear, permute_columns
from .masks import parse_target

METADATA = "permsparse.json"
FORMATS = ("masked", "folded")
FALLBACKS = ("masked", "gather")
# Layouts of a pruned linear in storage: "nm" (N:M in storage order: folded, or no permutation needed),
# "masked" (N:M through its permutation ``perm``), "gather" (N:M in storage order, stored permuted; the
# input must be gathered as ``x[..., perm]`` at run time).
LAYOUTS = ("nm", "masked", "gather")
REFERENCE_SEED = 0
REFERENCE_SHAPE = (1, 16)
REFERENCE_SAMPLES = 64
# Tolerance of the logits check, relative to the largest recorded |logit|.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def partial_dir(out: str | Path) -> Path:
    """Where a run writes (and keeps resume state) until it is complete."""
    out = Path(out)
    return out.with_name(out.name + ".partial")


def check_output_free(out: str | Path, overwrite: bool) -> None:
    """Refuse an existing output folder unless told to overwrite; call before any long work."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"output folder {out} exists; pass --overwrite to replace it")


def validate_export(export_format: str, fallback: str = "masked", pattern: str = "2:4") -> None:
    """Reject an export that cannot be made, before any long work (call it before pruning)."""
    if export_format not in FORMATS:
        raise ValueError(f"unknown export format {export_format!r}; choose one of {', '.join(FORMATS)}")
    if fallback not in FALLBACKS:
        raise ValueError(f"unknown fold fallback {fallback!r}; choose one of {', '.join(FALLBACKS)}")
    if export_format == "folded" and str(pattern).endswith("%"):
        raise ValueError(f"the folded export needs an N:M pattern; {pattern} is unstructured (use --export masked)")


# --------------------------------------------------------------------------------------------------
# Reference logits


def reference_tokens(vocab_size: int, seed: int = REFERENCE_SEED, shape: tuple[int, int] = REFERENCE_SHAPE) -> torch.Tensor:
    """The fixed input of the logits check: seeded uniform token ids in ``[0, vocab_size)``."""
    return torch.randint(0, vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def model_logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of ``tokens`` as float32 on the CPU (the model stays where it is)."""
    return model(tokens.to(_model_device(model))).logits.float().cpu()


def _sample_index(numel: int, seed: int) -> torch.Tensor:
    count = min(REFERENCE_SAMPLES, numel)
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed + 1))[:count].sort().values


def summarize_logits(logits: torch.Tensor, seed: int = REFERENCE_SEED) -> dict:
    """A small fingerprint of a logits tensor: max |logit|, per-position norms, seeded samples, a hash."""
    flat = logits.float().flatten()
    index = _sample_index(flat.numel(), seed)
    return {
        "shape": list(logits.shape),
        "max_abs": float(flat.abs().max()),
        "position_norms": logits.float().reshape(-1, logits.shape[-1]).norm(dim=-1).tolist(),
        "sample_index": index.tolist(),
        "sample": flat[index].tolist(),
        "sha256": hashlib.sha256(logits.float().contiguous().numpy().tobytes()).hexdigest(),
    }


def record_reference(model: nn.Module, seed: int = REFERENCE_SEED, shape: tuple[int, int] = REFERENCE_SHAPE) -> dict:
    """The ``reference`` entry of ``permsparse.json``: the fixed input and its logits' fingerprint."""
    vocab = model.get_input_embeddings().num_embeddings
    tokens = reference_tokens(vocab, seed, shape)
    dtype = next(model.parameters()).dtype
    return {
        "seed": seed, "tokens": tokens.tolist(), "dtype": str(dtype).removeprefix("torch."),
        "tolerance": TOLERANCE.get(dtype, 1e-4), "logits": summarize_logits(model_logits(model, tokens), seed),
    }


def compare_reference(logits: torch.Tensor, reference: dict, tolerance: float | None = None) -> tuple[bool, str]:
    """Compare logits with a recorded fingerprint; ``(ok, message)``.

    The error is the largest difference over the sampled logits and the per-position norms, relative to
    the largest recorded |logit| (small logits would make a per-value relative error meaningless).
    """
    ref = reference["logits"]
    tol = reference.get("tolerance", 1e-4) if tolerance is None else tolerance
    if list(logits.shape) != ref["shape"]:
        return False, f"logits have shape {list(logits.shape)}, recorded {ref['shape']}"
    flat = logits.float().flatten()
    sample = flat[torch.as_tensor(ref["sample_index"], dtype=torch.long)]
    norms = logits.float().reshape(-1, logits.shape[-1]).norm(dim=-1)
    scale = max(float(ref["max_abs"]), 1e-30)
    errors = {
        "sampled logits": float((sample - torch.tensor(ref["sample"])).abs().max()) / scale,
        "max |logit|": abs(float(flat.abs().max()) - ref["max_abs"]) / scale,
        "per-position norms": float((norms - torch.tensor(ref["position_norms"])).abs().max())
        / max(max(ref["position_norms"]), 1e-30),
    }
    worst = max(errors, key=errors.get)
    identical = hashlib.sha256(logits.float().contiguous().numpy().tobytes()).hexdigest() == ref.get("sha256")
    detail = f"max relative error {errors[worst]:.2e} ({worst}), tolerance {tol:.0e}" + (
        ", bit-identical" if identical else "")
    return errors[worst] <= tol, detail


# --------------------------------------------------------------------------------------------------
# Metadata helpers


def as_metadata(report_or_metadata) -> dict:
    """A :class:`permsparse.pruning.PruneReport` or a metadata dict, as a plain (copied) dict."""
    if is_dataclass(report_or_metadata):
        return asdict(report_or_metadata)
    return copy.deepcopy(dict(report_or_metadata))


def metadata_pattern(metadata: dict) -> tuple[str, float | tuple[int, int]]:
    """``("nm", (n, m))`` or ``("unstructured", density)`` from ``metadata["config"]["pattern"]``."""
    return parse_target(str(metadata.get("config", {}).get("pattern", "2:4")))


def site_permutations(metadata: dict) -> dict[str, torch.Tensor]:
    """Full linear name -> the permutation its mask was chosen through (from the pruning report)."""
    report = SimpleNamespace(layers=metadata.get("layers", []), permutations=metadata.get("permutations", {}))
    return permutations_by_linear(report)


def storage_permutations(metadata: dict) -> dict[str, tuple[str, torch.Tensor | None]]:
    """Full linear name -> ``(layout, perm)`` as stored in the checkpoint.

    ``perm`` is None for ``"nm"``; for ``"masked"`` the stored weight is N:M as ``W[:, perm]``; for
    ``"gather"`` the stored weight is N:M and the input must be gathered as ``x[..., perm]``. A masked
    checkpoint (no ``layouts``) has every layer masked through its pruning permutation (``"nm"`` where that
    is the identity). Unstructured layers are ``("unstructured", None)``.
    """
    kind, _ = metadata_pattern(metadata)
    names = [layer["name"] for layer in metadata.get("layers", [])]
    if kind == "unstructured":
        return {name: ("unstructured", None) for name in names}
    perms = site_permutations(metadata)
    layouts = metadata.get("layouts", {})
    out = {}
    for name in names:
        entry = layouts.get(name)
        if entry is None or entry["layout"] == "masked":
            perm = entry.get("perm") if entry else None
            perm = torch.as_tensor(perm, dtype=torch.long) if perm is not None else perms.get(name)
            if perm is None or torch.equal(perm, torch.arange(perm.numel())):
                out[name] = ("nm", None)
            else:
                out[name] = ("masked", perm)
        elif entry["layout"] == "gather":
            out[name] = ("gather", torch.as_tensor(entry["perm"], dtype=torch.long))
        else:
            out[name] = ("nm", None)
    return out


def _loading_note(gathers: bool) -> dict:
    if gathers:
        return {"plain_hf": False, "note": "some linears are stored permuted and need a runtime input gather: "
                "only permsparse.deploy.load(DIR) gives correct outputs; from_pretrained(DIR) loads but computes "
                "a different (wrong) function"}
    return {"plain_hf": True, "note": "plain Hugging Face checkpoint: from_pretrained(DIR) gives the pruned "
            "model's outputs exactly"}


# --------------------------------------------------------------------------------------------------
# Writing


def _write(model: nn.Module, tokenizer, out: Path, metadata: dict, overwrite: bool) -> Path:
    check_output_free(out, overwrite)
    staging = partial_dir(out)
    staging.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)
    (staging / METADATA).write_text(json.dumps(metadata, indent=1))
    shutil.rmtree(staging / ".resume", ignore_errors=True)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out


def save_checkpoint(
    model: nn.Module, tokenizer, out: str | Path, metadata: dict, overwrite: bool = False, reference: bool = True
) -> Path:
    """Save the model as it is (the masked format), tokenizer and metadata into ``out`` atomically.

    With ``reference`` the logits of the fixed input are recorded for :func:`check_checkpoint`.
    """
    out = Path(out)
    check_output_free(out, overwrite)
    metadata = dict(metadata)
    metadata.setdefault("format", "masked")
    metadata.setdefault("loading", _loading_note(False))
    if reference:
        metadata["reference"] = record_reference(model)
    return _write(model, tokenizer, out, metadata, overwrite)


def _residual_readers(model: nn.Module) -> set[str]:
    adapter = adapter_for(model)
    blocks = adapter.blocks(model)
    return {f"{adapter.blocks_path}.{i}.{rel}" for i in range(len(blocks)) for rel in adapter.residual_readers}


@torch.no_grad()
def fold_for_export(
    model: nn.Module, metadata: dict, fallback: str = "masked", hidden_perm: torch.Tensor | None = None
) -> tuple[dict, dict]:
    """Fold every exact permutation of a masked pruned model in place; returns ``(layouts, fold)``.

    ``metadata`` is the pruning report (``layers``, ``permutations``, ``config``). Linears whose permutation
    is the identity need nothing. The others go through :func:`permsparse.folding.fold_permutations`
    (with the optional global ``hidden_perm``); those that do not fold stay masked (``fallback="masked"``)
    or get their columns permuted and a recorded runtime gather (``fallback="gather"``). After a global
    hidden permutation a reader that did not fold is N:M through ``argsort(hidden)[p]``, which is what is
    recorded.
    """
    validate_export("folded", fallback, metadata.get("config", {}).get("pattern", "2:4"))
    names = [layer["name"] for layer in metadata.get("layers", [])]
    perms = site_permutations(metadata)
    identity = {name for name, p in perms.items() if torch.equal(p, torch.arange(p.numel()))}
    identity |= {name for name in names if name not in perms}
    hidden = None if hidden_perm is None else torch.as_tensor(hidden_perm, dtype=torch.long)
    to_fold = {name: perms[name] for name in names if name in perms and (hidden is not None or name not in identity)}
    result = fold_permutations(model, to_fold, hidden_perm=hidden)
    readers = _residual_readers(model) if hidden is not None else set()
    inverse = torch.argsort(hidden) if hidden is not None else None
    folded = set(result["folded"])
    layouts, not_folded, gathered, kept_identity = {}, {}, [], []
    for name in names:
        if name in folded:
            layouts[name] = {"layout": "nm"}
            continue
        p = perms.get(name)
        if p is None:
            p = torch.arange(linear_weight(model.get_submodule(name)).shape[1])
        q = inverse[p] if name in readers else p
        if torch.equal(q, torch.arange(q.numel())):
            layouts[name] = {"layout": "nm"}
            kept_identity.append(name)
            continue
        not_folded[name] = result["not_folded"].get(name, "permutation not folded")
        if fallback == "gather":
            permute_columns(model.get_submodule(name), q)
            layouts[name] = {"layout": "gather", "perm": q.tolist()}
            gathered.append(name)
        else:
            layouts[name] = {"layout": "masked"}
            if not torch.equal(q, p):
                layouts[name]["perm"] = q.tolist()
    total = max(len(names), 1)
    fold = {
        "fallback": fallback,
        "folded": [n for n in names if n in folded],
        "identity": kept_identity,
        "not_folded": not_folded,
        "gathered": gathered,
        "hidden_perm_applied": result["hidden_perm_applied"],
        "hidden_perm": hidden.tolist() if hidden is not None else None,
        # N:M in storage order without any runtime help (plain HF), and counting runtime gathers.
        "folded_share": (len(folded) + len(kept_identity)) / total,
        "storage_nm_share": (len(folded) + len(kept_identity) + len(gathered)) / total,
    }
    return layouts, fold


def export_checkpoint(
    model: nn.Module, tokenizer, out: str | Path, metadata, *, export_format: str = "masked",
    fallback: str = "masked", hidden_perm: torch.Tensor | None = None, overwrite: bool = False,
    in_place: bool = False, verify: bool = True,
) -> Path:
    """Write a pruned (masked, in-memory) model as ``export_format`` (``"masked"`` or ``"folded"``).

    ``metadata``: a :class:`permsparse.pruning.PruneReport` or the metadata dict the CLI builds (it must hold
    ``layers``, ``permutations`` and ``config``). The reference logits are recorded from the model before
    folding. The folded export works on a deep copy unless ``in_place`` (which saves memory but leaves
    ``model`` folded, and with ``fallback="gather"`` wrong without gathers). With ``verify`` the folded model
    (gathers attached) is run on the reference input and must reproduce the recorded logits.
    """
    out = Path(out)
    metadata = as_metadata(metadata)
    validate_export(export_format, fallback, metadata.get("config", {}).get("pattern", "2:4"))
    check_output_free(out, overwrite)
    if export_format == "masked":
        metadata["format"] = "masked"
        return save_checkpoint(model, tokenizer, out, metadata, overwrite=overwrite)
    reference = record_reference(model)
    target = model if in_place else copy.deepcopy(model)
    layouts, fold = fold_for_export(target, metadata, fallback, hidden_perm)
    gathers = {name: torch.as_tensor(e["perm"]) for name, e in layouts.items() if e["layout"] == "gather"}
    if verify:
        from .deploy import attach_gathers, remove_gathers

        attach_gathers(target, gathers)
        try:
            ok, detail = compare_reference(model_logits(target, torch.as_tensor(reference["tokens"])), reference)
        finally:
            remove_gathers(target)
        if not ok:
            raise RuntimeError(f"folded model does not reproduce the masked model's logits: {detail}")
        fold["verified"] = detail
    metadata.update(format="folded", layouts=layouts, fold=fold, loading=_loading_note(bool(gathers)),
                    reference=reference)
    return _write(target, tokenizer, out, metadata, overwrite)


def read_metadata(folder: str | Path) -> dict:
    path = Path(folder) / METADATA
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {METADATA}: not a permsparse checkpoint")
    return json.loads(path.read_text())


# --------------------------------------------------------------------------------------------------
# Checking


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
    logits_ok: bool = True
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def messages(self) -> list[str]:
        counts = ", ".join(f"{v} {k}" for k, v in sorted(self.layouts.items()))
        bad = sum(1 for v in self.layers.values() if v != "ok")
        lines = [f"{self.folder}: {self.format} checkpoint, {self.pattern}, {len(self.layers)} pruned linears "
                 f"({counts}); {len(self.layers) - bad} pass the pattern check",
                 f"reference logits: {self.logits}"]
        lines += [f"FAIL {f}" for f in self.failures]
        lines.append("OK" if self.ok else f"FAILED ({len(self.failures)} problems)")
        return lines

    def raise_for_failure(self) -> None:
        if self.failures:
            raise CheckFailed(f"{self.folder} failed the check: " + "; ".join(self.failures))


def _nm_problem(weight: torch.Tensor, n: int, m: int, where: str) -> str:
    """Empty when every group of ``m`` along the last dim has at most ``n`` non-zeros, else a description."""
    if weight.shape[-1] % m:
        return f"in_features {weight.shape[-1]} not divisible by {m}"
    counts = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
    bad = (counts > n).nonzero()
    if not len(bad):
        return ""
    row, group = bad[0].tolist()
    return (f"not {n}:{m} {where}: {len(bad)} groups with more than {n} non-zeros "
            f"(first: row {row}, columns {group * m}..{group * m + m - 1} holds {int(counts[row, group])})")


def check_checkpoint(folder: str | Path, *, device: str = "cpu", tolerance: float | None = None) -> CheckReport:
    """Verify a permsparse checkpoint: the sparsity pattern of every pruned linear, and the logits.

    N:M is checked in storage order for ``nm`` and ``gather`` layers and through the recorded permutation
    for ``masked`` layers (``W[:, p]``); unstructured layers must keep at most their share per row. The model
    is loaded with :func:`permsparse.deploy.load` (runtime gathers re-attached) and its logits on the
    recorded input compared with the recorded ones. Never raises for a failed check: see
    :meth:`CheckReport.raise_for_failure`. Raises FileNotFoundError for a folder that is no checkpoint.
    """
    from .deploy import load

    folder = Path(folder)
    metadata = read_metadata(folder)
    kind, target = metadata_pattern(metadata)
    report = CheckReport(str(folder), metadata.get("format", "masked"), metadata.get("config", {}).get("pattern", "?"))
    model = load(folder, device=device)
    for name, (layout, perm) in storage_permutations(metadata).items():
        report.layouts[layout] = report.layouts.get(layout, 0) + 1
        try:
            module = model.get_submodule(name)
        except AttributeError:
            problem = "no such linear in the checkpoint"
        else:
            weight = linear_weight(module).detach().cpu()
            if kind == "unstructured":
                keep = int(round(weight.shape[1] * target))
                most = int((weight != 0).sum(1).max())
                problem = f"a row keeps {most} weights, more than {keep}" if most > keep else ""
            else:
                n, m = target
                if layout == "masked":
                    if perm.numel() != weight.shape[1]:
                        problem = f"recorded permutation has {perm.numel()} entries, the layer {weight.shape[1]} inputs"
                    else:
                        problem = _nm_problem(weight[:, perm], n, m, "through its permutation (masked layout)")
                else:
                    problem = _nm_problem(weight, n, m, f"in storage order ({layout} layout)")
        report.layers[name] = problem or "ok"
        if problem:
            report.failures.append(f"{name}: {problem}")
    reference = metadata.get("reference")
    if reference is None:
        report.logits = "none recorded (exported without a reference); not compared"
    else:
        logits = model_logits(model, torch.as_tensor(reference["tokens"], dtype=torch.long))
        report.logits_ok, report.logits = compare_reference(logits, reference, tolerance)
        if not report.logits_ok:
            report.failures.append(f"logits: do not match the recorded reference: {report.logits}")
    return report


def check_command(folder: str | Path, device: str = "cpu", tolerance: float | None = None) -> tuple[int, list[str]]:
    """``permsparse check DIR``: exit code (0 pass, 1 check failed, 2 not a checkpoint) and lines to print."""
    try:
        report = check_checkpoint(folder, device=device, tolerance=tolerance)
    except (FileNotFoundError, ValueError, OSError) as err:
        return 2, [f"permsparse: error: {err}"]
    return (0 if report.ok else 1), report.messages()
