"""What decides a pruned model: one small typed config per concern, validated when it is built.

``PruneConfig`` holds the sparsity pattern, the host score that chooses the mask, which linears are
pruned, how permutations are bound to linears, the calibration data, and the permutation: either a
:class:`Search` (a heuristic chosen per site) or a :class:`Learned` one (trained from a search's
result). Each field's help text lives beside it; the command line is built from these fields
(:mod:`permsparse.cli`), so a default is written once, here. The same config gives the same model.
Where a run computes (:class:`Placement`) and how the pruned model is written (:class:`ExportConfig`)
are configs here too. Importing this module imports neither torch nor transformers, so the command line
parses and refuses its arguments at once.
"""
from __future__ import annotations

import hashlib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .serial import check_choices, from_dict, option, to_dict

# Names the command line knows before anything loads (never importing torch or transformers for them)
SMOLLM2_ALIAS = "smollm2-135m"  # permsparse.models.smollm2: the embedded default model
TESTBED_ALIAS = "cifar10-vit"  # permsparse.models.vit_testbed: a CIFAR-10 ViT built here
VLM_ALIAS = "cifar10-vlm"  # permsparse.models.vlm_testbed: a small vision-language model built here
VLM_TASK = "cifar10-vlm"  # permsparse.evaluate.vlm: ten-way CIFAR-10 accuracy and caption perplexity

SELF = "self"  # calibration windows sampled from the dense model (permsparse.data.text.sampled_windows)
SEARCH_METHODS = ("none", "cp", "ria", "output")
TEST_SOURCES = ("wikitext2",)  # evaluation text: refused for calibration unless asked for explicitly


def parse_pattern(pattern: str) -> tuple[int, int] | float:
    """``"2:4"`` -> ``(2, 4)``; an unstructured sparsity ``"50%"`` -> its density ``0.5``; ``"none"`` (dense:
    nothing pruned, the reference of a quantized run) -> ``1.0``."""
    if pattern == "none":
        return 1.0
    if pattern.endswith("%"):
        try:
            sparsity = float(pattern[:-1]) / 100
        except ValueError:
            raise ValueError(f"pattern {pattern!r} is neither N:M nor a percentage like 50%") from None
        if not 0.0 < sparsity < 1.0:
            raise ValueError(f"unstructured sparsity pattern {pattern} must be between 0% and 100%")
        return 1.0 - sparsity
    parts = pattern.split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"pattern {pattern!r} is not of the form N:M (e.g. 2:4) nor a percentage like 50%")
    n, m = (int(p) for p in parts)
    if not 0 < n < m:
        raise ValueError(f"pattern {n}:{m} is invalid: need 0 < N < M (e.g. 2:4, 4:8, 1:4)")
    return n, m


def mixture(source: str) -> list[tuple[str, float]]:
    """``"c4"`` -> ``[("c4", 1.0)]``; ``"c4:3,alpaca:1"`` -> ``[("c4", 0.75), ("alpaca", 0.25)]`` (weights
    normalised; a source without ``:w`` weighs 1)."""
    parts = []
    for item in source.split(","):
        name, _, weight = item.strip().rpartition(":") if ":" in item and not Path(item).is_file() else (item.strip(), "", "1")
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"calibration mixture {source!r}: weight {weight!r} of {name!r} is not a number") from None
        if value <= 0 or not name:
            raise ValueError(f"calibration mixture {source!r}: every part needs a name and a weight above 0")
        parts.append((name, value))
    total = sum(w for _, w in parts)
    return [(name, w / total) for name, w in parts]


@dataclass(frozen=True)
class Calibration:
    """The calibration windows: text source, how many, how long, and how blocks see them."""

    source: str = option("c4", "calibration text: a source name (c4, c4-demo, alpaca, wikitext2-valid, shakespeare; "
                         "self: text the dense model samples itself), a weighted mix such as c4:3,alpaca:1, or a text "
                         "file; general web text by default, as the "
                         "literature calibrates, so no evaluation text is the calibration's domain", flag="--calib")
    temperature: float = option(1.0, "temperature at which the dense model samples the windows of --calib self: "
                                "above 1 the samples reach text the model finds less likely",
                                flag="--sample-temperature")
    nsamples: int = option(32, "calibration windows")
    seqlen: int = option(512, "tokens per calibration window")
    seed: int = option(0, "seed of the window draw and of every search and learner")
    holdout: int = option(8, "further windows of the calibration text, disjoint from the training windows, on which "
                          "a learned permutation is judged (the best judged one is kept)")
    propagate: Literal["pruned", "dense"] = option(
        "pruned", "each block is calibrated on the pruned or the dense outputs of the blocks before it "
        "(the e2e learned permutation always uses the dense model's)")
    batch_size: int = option(8, "windows per forward pass while collecting statistics")
    allow_test_text: bool = option(False, "allow calibrating on an evaluation text (wikitext2, the test split)",
                                   flag="--allow-test-calibration")

    def __post_init__(self):
        check_choices(self)
        if self.nsamples < 1 or self.seqlen < 2 or self.holdout < 0 or self.batch_size < 1 or not self.temperature > 0:
            raise ValueError("need nsamples >= 1, seqlen >= 2, holdout >= 0, batch size >= 1 and a sampling "
                             "temperature above 0")
        if self.temperature != 1.0 and not self.samples_text:
            raise ValueError(f"--sample-temperature applies to text the model samples (--calib self), not to "
                             f"{self.source!r}")
        if self.source in TEST_SOURCES and not self.allow_test_text:
            raise ValueError(f"calibration source {self.source!r} is the evaluation text: calibrate on wikitext2-valid, "
                             "c4 or another source, or pass --allow-test-calibration if you mean it")

    @property
    def samples_text(self) -> bool:
        """Whether part of the text source is sampled from the dense model (``self``)."""
        return SELF in (name for name, _ in mixture(self.source))


@dataclass(frozen=True)
class Search:
    """A permutation found by a heuristic search, per site (see :mod:`permsparse.permute.search`)."""

    KIND = "search"
    method: Literal["none", "cp", "ria", "output"] = option(
        "none", "input-channel permutation: none, cp (Pool & Yu's channel swaps), ria (RIA's bands and per-slot "
        "assignment), output (swaps that lower each linear's output error), or learned", flag="--perm")
    chunks: int = option(1, "split the channels into this many contiguous chunks, each searched on its own "
                         "(bounds the cost on very wide layers)")
    compensate: bool = option(True, "output search with pruned propagation: aim each linear at the dense model's "
                              "outputs from the pruned model's inputs (two more passes of each block); off aims at "
                              "the linear's own outputs on the pruned inputs")

    def __post_init__(self):
        check_choices(self)
        if self.chunks < 1:
            raise ValueError("chunks must be >= 1")


@dataclass(frozen=True)
class Learned:
    """A permutation trained with every model weight frozen (only cost matrices train).

    It starts at the ``init`` search's result and refines it within tiles of ``tile`` channels: per
    tile a cost matrix, its log-domain Sinkhorn relaxation in the backward pass and its Hungarian
    solution in the forward pass (``forward="hard"``). The best hard permutation judged on the
    held-out windows is kept, so learning never returns worse than its start on that judgment. The
    default objective distils the dense model (its next-token distributions and every block's output)
    instead of fitting the calibration text's tokens, so what is learned holds on other texts.
    """

    KIND = "learned"
    init: Literal["output", "ria", "cp", "none", "random"] = option(
        "ria", "warm start: a search's permutation, or random costs")
    scope: Literal["e2e", "blockwise"] = option(
        "e2e", "e2e: every permutation of the model at once on the objective below; blockwise: one block at a time "
        "against the dense block's outputs (memory of one block, for models too large for e2e)")
    ce: float = option(0.0, "e2e: weight of the cross-entropy of the pruned model on the calibration windows")
    kl: float = option(1.0, "e2e: weight of the KL divergence of the pruned model's next-token distributions from "
                       "the dense model's (logit distillation)")
    hidden: float = option(1.0, "e2e: weight of the distillation of every block's output against the dense model's")
    hidden_loss: Literal["mse", "smoothl1", "cosine"] = option(
        "mse", "distance of a pruned block's output to the dense one (e2e and blockwise), scale-free")
    steps: int = option(20, "training steps (e2e: for the model; blockwise: per block)")
    batch: int = option(0, "windows per training step; 0: 1 for e2e, 4 for blockwise")
    lr: float = option(0.1, "AdamW learning rate of the cost matrices (normalised costs: units of their spread)")
    eps_start: float = option(0.5, "Sinkhorn temperature at the first step")
    eps_end: float = option(0.05, "Sinkhorn temperature at the last step (geometric annealing)")
    sinkhorn_iters: int = option(20, "Sinkhorn iterations per step")
    forward: Literal["hard", "soft"] = option(
        "hard", "permutation used in the training forward pass: hard (Hungarian, with the Sinkhorn gradient) or "
        "soft (the Sinkhorn matrix)")
    tile: int = option(64, "channels per learned tile; the attention output's tiles are its heads")
    warm_sharpness: float = option(0.9, "share of each row's soft mass on the warm start at eps_start")
    judge_every: int = option(5, "steps between judgments of the hard permutations on the held-out windows")
    recompute: bool = option(False, "e2e: keep only each block's input for the backward pass and run the block again "
                             "there (activation checkpointing: much less memory, about a third more time)")
    fake_quant: bool = option(False, "with --quant: training and judgment see the kept weights as deployed, rounded to "
                              "nearest in the permuted groups (straight-through gradient); off: unquantized")

    def __post_init__(self):
        check_choices(self)
        if self.steps < 1 or self.batch < 0 or self.tile < 1 or self.sinkhorn_iters < 1 or self.judge_every < 1:
            raise ValueError("need steps, tile, sinkhorn iters and judge every >= 1 and batch >= 0")
        if not 0 < self.eps_end <= self.eps_start:
            raise ValueError(f"need 0 < eps_end <= eps_start, got {self.eps_end} and {self.eps_start}")
        if not 0 < self.warm_sharpness < 1:
            raise ValueError("warm sharpness must be in (0, 1)")
        if min(self.ce, self.kl, self.hidden) < 0:
            raise ValueError("objective weights must be >= 0")
        if self.scope == "e2e" and self.ce == 0 and self.kl == 0 and self.hidden == 0:
            raise ValueError("the e2e objective is empty: give --ce, --kl or --hidden a weight above 0")

    @property
    def windows_per_step(self) -> int:
        return self.batch or (1 if self.scope == "e2e" else 4)

    def eps_at(self, step: int) -> float:
        """Geometric annealing: ``eps_start`` at step 0, ``eps_end`` at the last step."""
        frac = step / max(self.steps - 1, 1)
        return self.eps_start * (self.eps_end / self.eps_start) ** frac


@dataclass(frozen=True)
class Distill:
    """Distillation of the kept weights after pruning (off at 0 steps).

    Every pruned linear's kept weights train towards the dense model's outputs, on fresh windows of the
    calibration text, one batch per step (AdamW, a short warm-up, then cosine decay); the weights judged
    best on the held-out windows are kept. The objective is that of the learned permutation
    (:mod:`permsparse.permute.objective`): KL from the dense model's next-token distributions by default, so the
    pruned model follows the dense model rather than the calibration text's tokens. Each N:M (or
    unstructured) mask stays as pruning chose it, or follows the weights as they train, through a fixed or
    a learned permutation (``masks``, :mod:`permsparse.train.following_masks`).
    """

    steps: int = option(0, "steps of distillation of the kept weights after pruning (0: none)", flag="--distill-steps")
    batch: int = option(2, "calibration windows per distillation step, each drawn once", flag="--distill-batch")
    lr: float = option(1e-3, "peak AdamW learning rate of the kept weights", flag="--distill-lr")
    ce: float = option(0.0, "weight of the cross-entropy on the calibration windows' tokens", flag="--distill-ce")
    kl: float = option(1.0, "weight of the KL divergence from the dense model's next-token distributions",
                       flag="--distill-kl")
    hidden: float = option(0.0, "weight of the distance of every block's output to the dense model's",
                           flag="--distill-hidden")
    hidden_loss: Literal["mse", "smoothl1", "cosine"] = option("mse", "distance of a block's output to the dense one",
                                                               flag="--distill-hidden-loss")
    judge_every: int = option(25, "steps between judgments on the held-out windows (the best judged weights are kept)",
                              flag="--distill-judge-every")
    masks: Literal["fixed", "dynamic", "joint", "alternate"] = option(
        "fixed", "the masks while the weights train: fixed as pruning chose them; dynamic: chosen again every step "
        "from the current weights (the host score on the pruning's statistics) through each site's permutation, "
        "every weight training (pruned ones straight through); joint: dynamic, each site's permutation learned "
        "along from the pruning's; alternate: phases of --distill-judge-every steps, the permutations alone on the "
        "current weights, then the weights alone", flag="--distill-masks")
    perm_lr: float = option(0.1, "joint, alternate: AdamW learning rate of the permutations' cost tiles",
                            flag="--distill-perm-lr")

    def __post_init__(self):
        check_choices(self)
        if self.steps < 0 or self.batch < 1 or self.judge_every < 1 or self.lr <= 0 or self.perm_lr <= 0:
            raise ValueError("need distill steps >= 0, distill batch and judge every >= 1 and learning rates > 0")
        if min(self.ce, self.kl, self.hidden) < 0:
            raise ValueError("distillation objective weights must be >= 0")
        if self.steps and self.ce == 0 and self.kl == 0 and self.hidden == 0:
            raise ValueError("the distillation objective is empty: give --distill-ce, --distill-kl or "
                             "--distill-hidden a weight above 0")

    @property
    def windows(self) -> int:
        """Calibration windows the distillation trains on, each once."""
        return self.steps * self.batch


Permutation = typing.Union[Search, Learned]


@dataclass(frozen=True)
class Quantization:
    """Quantization of the kept weights after pruning (off with ``none``; see :mod:`permsparse.quant`).

    Symmetric codes times scales, groups along the permuted input order; each block's pruned linears are
    quantized before the next block's inputs are computed, and the model then runs the dequantized weights.
    """

    kind: Literal["none", "int8", "fp8", "int4"] = option(
        "none", "quantize the kept weights: int8 or fp8 (e4m3) with one scale per output channel, int4 with one "
        "scale per group of --quant-group permuted inputs", flag="--quant")
    group: int = option(0, "inputs per quantization scale, consecutive in the permuted order (0: 128 for int4, "
                        "the whole row, one scale per output channel, for int8 and fp8)", flag="--quant-group")
    method: Literal["rtn", "gptq"] = option(
        "gptq", "rtn: round to nearest; gptq: round column by column and move each error onto the kept weights "
        "not yet rounded, on the layer's H = X^T X (needs calibration)", flag="--quant-method")

    def __post_init__(self):
        check_choices(self)
        if self.group < 0:
            raise ValueError(f"--quant-group must be >= 0, got {self.group}")
        if self.kind == "none" and (self.group or self.method != "gptq"):
            raise ValueError("--quant-group and --quant-method apply only with --quant int8, fp8 or int4")

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    @property
    def needs_hessian(self) -> bool:
        """Whether quantizing needs each linear's input Gram matrix (GPTQ)."""
        return self.enabled and self.method == "gptq"

    def group_for(self, width: int) -> int:
        """Inputs per scale of a linear ``width`` inputs wide (it may not divide ``width``: then the linear
        stays unquantized, see :func:`permsparse.quant.apply.indivisible`)."""
        if self.group:
            return self.group
        return 128 if self.kind == "int4" else width


@dataclass(frozen=True)
class PruneConfig:
    """Everything that decides the pruned model (see the module docstring)."""

    pattern: str = option("2:4", "N:M (2:4, 4:8, 1:4, ...), an unstructured sparsity like 50% (the reference "
                          "limit for N:M at the same density), or none (dense: nothing pruned, e.g. with --quant)")
    score: Literal["magnitude", "wanda", "ria", "sparsegpt", "admm"] = option(
        "wanda", "host choosing the mask: magnitude |W|, wanda |W|*||X_j||, ria (relative importance * ||X_j||^0.5), "
        "or a host that also updates the kept weights on the layer's H = X^T X: sparsegpt (OBS updates, SparseGPT) "
        "or admm (ADMM with gradual mask selection); with these the permutation is chosen on Wanda's score, then "
        "the update runs on the permuted columns")
    update_mask: Literal["own", "permutation"] = option(
        "own", "sparsegpt/admm hosts: choose their own N:M mask inside the permuted groups, or keep the mask the "
        "permutation chose (Wanda's, or the learned permutation's)")
    permutation: Permutation = field(default_factory=Search)
    binding: Literal["per-linear", "shared", "global"] = option(
        "per-linear", "per-linear: each linear its own permutation; shared: linears reading one input share one "
        "(the attention output's stays within heads), so o/down fold; global: as shared plus one hidden "
        "permutation for the residual stream, so every permutation folds")
    calibration: Calibration = field(default_factory=Calibration)
    distill: Distill = field(default_factory=Distill)
    quant: Quantization = field(default_factory=Quantization)
    towers: Literal["language", "vision", "both"] = option(
        "language", "which towers of a vision-language model are pruned: language (its language model, as the "
        "seed paper), vision (its image encoder, calibrated on the image sources of --calib, such as "
        "--calib c4:1,cifar10:1), or both; the projector and the embeddings stay dense")
    include: tuple[str, ...] = option((), "glob patterns of full linear names to prune (default: all)")
    exclude: tuple[str, ...] = option((), "glob patterns of full linear names to keep dense")
    strict: bool = option(False, "fail on layers whose in_features is not divisible by M instead of skipping them")

    def __post_init__(self):
        check_choices(self)
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        target = parse_pattern(self.pattern)
        if isinstance(target, float) and self.permuted:
            raise ValueError("permutations only matter for N:M patterns, not unstructured sparsity")
        if self.learned is not None and self.calibration.holdout < 1:
            raise ValueError("a learned permutation is judged on held-out windows: --holdout must be at least 1")
        if self.distill.steps and self.calibration.holdout < 1:
            raise ValueError("distillation is judged on held-out windows: --holdout must be at least 1")
        if self.quant.enabled and self.distill.steps:
            raise ValueError("--quant with --distill-steps: distillation would change the weights after they are "
                             "quantized; quantize without distillation")
        if self.distill.masks in ("joint", "alternate") and not self.nm:
            raise ValueError(f"--distill-masks {self.distill.masks} learns permutations, which only N:M patterns have")

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(n, m)`` for an N:M pattern, None for unstructured."""
        target = parse_pattern(self.pattern)
        return None if isinstance(target, float) else target

    @property
    def density(self) -> float:
        """Share of weights kept."""
        target = parse_pattern(self.pattern)
        return target if isinstance(target, float) else target[0] / target[1]

    @property
    def host(self) -> str:
        """The score that chooses permutations and masks (Wanda's for the weight-updating hosts)."""
        return "wanda" if self.updates else self.score

    @property
    def updates(self) -> bool:
        """Whether the host updates the weights it keeps (sparsegpt, admm)."""
        return self.score in ("sparsegpt", "admm")

    @property
    def judged(self) -> bool:
        """Whether the run judges something on held-out windows (a learned permutation, distillation)."""
        return self.learned is not None or self.distill.steps > 0

    @property
    def learned(self) -> Learned | None:
        return self.permutation if isinstance(self.permutation, Learned) else None

    @property
    def start(self) -> str:
        """The search that chooses each site's permutation (a learned one's warm start)."""
        return self.permutation.init if self.learned else self.permutation.method

    @property
    def permuted(self) -> bool:
        return self.learned is not None or self.permutation.method != "none"

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PruneConfig":
        return from_dict(cls, data)

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Placement:
    """Where the pipeline computes (the device, and whether the blocks stay on the host)."""

    device: str = option("auto", "cpu, cuda, cuda:N, or auto (this process's CUDA device when there is one: cuda:0, "
                         "or cuda:LOCAL_RANK under torchrun; else the CPU)")
    offload: Literal["auto", "on", "off"] = option(
        "auto", "keep the blocks on the host and move one at a time to the device (on), never (off), or when the "
        "memory estimate says the model and the run do not fit the device together (auto)")

    def __post_init__(self):
        check_choices(self)
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):  # whether it exists is checked where it is used
            raise ValueError(f"unknown device {self.device!r}: use auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class ExportConfig:
    """How the pruned model is written."""

    format: Literal["masked", "folded", "compressed"] = option(
        "masked", "masked: W*unpermute(mask) in the original order (loads anywhere); folded: fold every exact "
        "permutation so those linears are N:M in storage order; compressed: every pruned linear as its kept values "
        "and packed positions (with --quant: codes and scales), about half the bytes, read by permsparse.load",
        flag="--export")
    fallback: Literal["masked", "gather"] = option(
        "masked", "linears whose permutation cannot fold: keep them masked (plain HF) or store them permuted with "
        "a runtime gather (needs permsparse.load)", flag="--fold-fallback")
    save_dtype: Literal["auto", "bfloat16", "float16", "float32"] = option(
        "auto", "dtype of the saved weights (auto: for --export compressed the model config's 16-bit dtype, else "
        "bfloat16; for masked and folded the dtype the model ran in)", flag="--save-dtype")

    def __post_init__(self):
        check_choices(self)
