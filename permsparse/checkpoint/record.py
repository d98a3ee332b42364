"""``permsparse.json``: the typed, versioned record of a pruned checkpoint, read and written here only.

Beside the Hugging Face files, a checkpoint folder holds one JSON record: what was pruned and how
(the config and the run's report), how every pruned linear is stored (its layout), what folded, the
logits of a fixed input recorded at export (so ``permsparse check`` can prove the reload exact), the
metrics measured, and a digest of every stored tensor (:mod:`.digest`). Reading is strict: a record of another format version, or with a missing or
unknown field, is an error, never a default.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import PruneConfig
from ..evaluate.measures import Perplexity, Similarity
from ..data.images import Accuracy
from ..report import PruneReport
from ..serial import RecordError, from_dict, to_dict
from ..evaluate.zeroshot import TaskResult

FILENAME = "permsparse.json"
FORMAT_VERSION = 7


@dataclass
class Layout:
    """How one pruned linear is stored.

    ``nm``: N:M in storage order (folded, or no permutation needed); ``masked``: ``W * unpermute(mask)``
    in the original order, N:M as ``W[:, perm]``; ``gather``: stored permuted (N:M in storage order),
    the input must be gathered as ``x[..., perm]`` at run time; ``unstructured``: no N:M pattern.
    """

    layout: Literal["nm", "masked", "gather", "unstructured"]
    perm: list[int] | None = None


@dataclass
class FoldRecord:
    """What a folded export did: which permutations folded exactly, and why the others did not."""

    fallback: Literal["masked", "gather"]
    folded: list[str]
    identity: list[str]
    not_folded: dict[str, str]
    gathered: list[str]
    hidden_perm_applied: bool
    folded_share: float
    storage_nm_share: float
    verified: str


@dataclass
class LogitsSummary:
    """A small fingerprint of a logits tensor: max |logit|, per-position norms, seeded samples, a hash."""

    shape: list[int]
    max_abs: float
    position_norms: list[float]
    sample_index: list[int]
    sample: list[float]
    sha256: str


@dataclass
class Reference:
    """The fixed, seeded input of the logits check and the fingerprint of the logits recorded at export.

    ``tokens`` is empty for an image model: its input is made again from ``seed`` and its image size.
    """

    seed: int
    tokens: list[list[int]]
    dtype: str
    tolerance: float
    logits: LogitsSummary


@dataclass
class StorageRecord:
    """How the tensors are stored and what they cost: ``dense`` (masked or folded export) or ``compressed``
    (:mod:`.compressed`), the dtype of the weights, the quantization of the pruned linears (kind, inputs
    per scale, method; ``none``), the bytes of the weight files, of the pruned linears as stored, and of
    the same linears dense in bf16, and (compressed) the SHA-256 of every stored linear's expanded weight,
    signed zeros as +0 (what ``permsparse check`` proves the stored form reproduces)."""

    format: Literal["dense", "compressed"]
    dtype: str
    quantization: str
    group: int | None
    method: str | None
    weights_bytes: int
    pruned_bytes: int
    pruned_dense_bf16_bytes: int
    expanded_sha256: dict[str, str] = field(default_factory=dict)

    @property
    def pruned_ratio(self) -> float:
        """Bytes of the pruned linears as stored over the same linears dense in bf16."""
        return self.pruned_bytes / max(self.pruned_dense_bf16_bytes, 1)


@dataclass
class BlockKinds:
    """Which kind each block of the pruned stack (at ``blocks_path``) is: ``linears`` lists the linears of
    every kind (block-relative, routers included, in forward order), ``of_block`` the index of each
    block's kind (blocks of several kinds: dense and mixture-of-experts blocks, attention and
    linear-attention blocks)."""

    blocks_path: str
    linears: list[list[str]]
    of_block: list[int]


@dataclass
class CheckpointRecord:
    """Everything ``permsparse.json`` holds."""

    format_version: int
    permsparse_version: str
    model: str
    config: PruneConfig
    report: PruneReport
    export: Literal["masked", "folded", "compressed"]
    layouts: dict[str, Layout]
    fold: FoldRecord | None
    plain_hf: bool  # from_pretrained(DIR) alone gives the pruned model's outputs (no runtime gather needed)
    reference: Reference
    storage: StorageRecord | None  # None: written by format version 5, before it was recorded
    blocks: BlockKinds | None  # None: written before format version 7, or a model discovery does not understand
    metrics: dict[str, Perplexity | Similarity | Accuracy] = field(default_factory=dict)
    zero_shot: list[TaskResult] = field(default_factory=list)
    command: str = ""
    tensors: dict[str, str] = field(default_factory=dict)  # sha256 of every stored tensor (checkpoint.digest)


def write_record(folder: str | Path, record: CheckpointRecord) -> Path:
    path = Path(folder) / FILENAME
    path.write_text(json.dumps(to_dict(record), indent=1))
    return path


def read_record(folder: str | Path) -> CheckpointRecord:
    """The record of a checkpoint folder; FileNotFoundError when there is none, RecordError when malformed."""
    path = Path(folder) / FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {FILENAME}: not a permsparse checkpoint")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise RecordError(f"{path} is not a readable {FILENAME}: {err}") from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version == 5 and "storage" not in data:  # version 6 added only the storage record
        data = {**data, "format_version": 6, "storage": None}
        version = 6
    if version == 6 and "blocks" not in data:  # version 7 added only the kinds of the blocks
        data = {**data, "format_version": FORMAT_VERSION, "blocks": None}
        version = FORMAT_VERSION
    report = data.get("report") if version == FORMAT_VERSION else None
    if isinstance(report, dict) and "kept_dense" not in report:  # written before parameters of no linear were listed
        data = {**data, "report": {**report, "kept_dense": {}}}
    if version != FORMAT_VERSION:
        raise RecordError(f"{path}: format version {version!r}, this permsparse reads version {FORMAT_VERSION}")
    return from_dict(CheckpointRecord, data, str(path))
