"""What a pruning run did, as typed records: layers, permutation sites, training, time and memory.

:func:`permsparse.prune` returns a :class:`PruneReport`; the checkpoint stores it in ``permsparse.json``
(:mod:`permsparse.checkpoint.record`).
"""
from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

# What a run spends its time on: drawing (or sampling) the calibration windows; forward passes that collect
# statistics or make the next block's inputs; permutation searches; learning permutations; choosing masks and
# updating weights; quantizing the kept weights; distilling the kept weights.
STAGES = ("calibration", "statistics", "search", "learning", "pruning", "quantization", "distillation")


@dataclass
class LayerRecord:
    """One pruned linear: the share of its host score kept, with and without its permutation, and (when
    the input Gram matrix was collected, as the output search does) its output error ``sum_r d_r H d_r^T``
    relative to the dense output's energy ``sum_r w_r H w_r^T``, with and without the permutation."""

    name: str
    shape: tuple[int, int]
    site: str | None
    kept_score: float
    kept_score_identity: float | None
    search_seconds: float | None
    output_error: float | None = None
    output_error_identity: float | None = None


@dataclass
class SiteRecord:
    """Linears whose inputs share one permutation, and that permutation (the permuted layer is ``W[:, perm]``)."""

    name: str
    linears: list[str]
    perm: list[int]


@dataclass
class TrainingRecord:
    """The history of one learned scope (``model`` for e2e, a block's name for blockwise).

    ``judged`` holds ``(step, value)`` for every judgment of the hard permutations on the held-out
    windows; ``best_judged`` is the value of the set that was kept.
    """

    scope: str
    loss: list[float]
    eps: list[float]
    judged: list[tuple[int, float]]
    init_judged: float
    best_judged: float
    best_step: int
    seconds: float


@dataclass
class DistillRecord:
    """The history of the distillation of the kept weights: the loss at every step, and ``(step, value)``
    for every judgment on the held-out windows (step 0 is the pruned model before any step); the weights
    of ``best_step`` were kept. ``moved`` is the share of the pruning's kept entries that the kept weights'
    masks no longer keep (0 with fixed masks)."""

    loss: list[float]
    judged: list[tuple[int, float]]
    best_judged: float
    best_step: int
    seconds: float
    moved: float = 0.0

    @property
    def seconds_per_step(self) -> float:
        """Wall seconds per step, the held-out judgments included."""
        return self.seconds / max(len(self.loss), 1)


@dataclass
class QuantRecord:
    """One quantized linear: its kind, inputs per scale and method, and the output error of its codes
    ``sum_r d_r H d_r^T`` (``d``: pruned weight minus dequantized codes) relative to the pruned output's energy
    ``sum_r w_r H w_r^T``, for the method and for round-to-nearest (None where no ``H`` was collected)."""

    name: str
    kind: str
    group: int
    method: str
    output_error: float | None = None
    output_error_rtn: float | None = None


@dataclass
class PruneReport:
    """The result of :func:`permsparse.prune`."""

    layers: list[LayerRecord] = field(default_factory=list)
    sites: list[SiteRecord] = field(default_factory=list)
    hidden_perm: list[int] | None = None
    skipped: list[str] = field(default_factory=list)
    training: list[TrainingRecord] = field(default_factory=list)
    dense: list[str] = field(default_factory=list)  # routers of mixture-of-experts layers: never pruned
    kept_dense: dict[str, str] = field(default_factory=dict)  # parameters of no linear (full name: why), never pruned
    uncalibrated: list[str] = field(default_factory=list)  # no calibration token reached them: white-input stats
    kept_start: list[str] = field(default_factory=list)  # sites where the update kept the search, not the learned one
    distillation: DistillRecord | None = None  # the kept weights' distillation, when it ran
    weights_updated: bool = False  # kept weights changed (sparsegpt, admm, distillation): W is not W * mask
    quantized: list[QuantRecord] = field(default_factory=list)  # linears whose kept weights were quantized
    unquantized: list[str] = field(default_factory=list)  # linears --quant left as they were (a group not dividing)
    seconds: float = 0.0
    stages: dict[str, float] = field(default_factory=dict)  # seconds by stage (:data:`STAGES`), summed over blocks
    peak_rss_mb: float = 0.0
    peak_device_mb: float | None = None  # peak memory allocated on the GPU the run computed on

    @contextmanager
    def timed(self, stage: str):
        """Add the seconds spent inside to ``stages[stage]`` (GPU work included: the device is synchronised)."""
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
        _synchronise()
        started = time.perf_counter()
        try:
            yield
        finally:
            _synchronise()
            self.stages[stage] = self.stages.get(stage, 0.0) + time.perf_counter() - started

    def permutation_of(self, linear: str) -> list[int] | None:
        """The permutation the named linear's mask was chosen through, if it has one."""
        for site in self.sites:
            if linear in site.linears:
                return site.perm
        return None


def _synchronise() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def peak_device_mb(device: torch.device) -> float | None:
    """Peak memory allocated on ``device`` so far (a GPU), or None on the CPU."""
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
