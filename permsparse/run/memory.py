"""What a run will hold, estimated before the heavy work, so a run that cannot fit stops at once.

The estimate counts what grows with the configuration on top of the loaded model: the calibration
windows' hidden states (block by block), the statistics of one block, and for the ``e2e`` learned
permutation one training step's graph (the relaxed weights, the masks, every block's activations at
``--batch`` windows, the dense model's hidden states of that batch, one chunk of logits), and for
distillation the kept weights' training state and one step's graph at ``--distill-batch`` windows. It is an
estimate: the run stops when it exceeds the memory available, with the flags that lower it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..discover.adapters import linear_weight
from ..discover import blocks_config

GIB = 2**30
# Floats kept per token and block for the backward pass of a decoder block, in units of the hidden
# width and of the MLP width (norm inputs, q/k/v/o, rotary, attention output, gate/up/act/down), and
# copies of the attention scores; fitted to the peak memory of SmolLM2-135M's e2e learning.
ACT_PER_HIDDEN, ACT_PER_FFN, ATTENTION_COPIES = 18, 8, 2
LOGIT_CHUNK_BYTES = 3 * 2**24 * 4  # logits, log-softmax and gradient of one chunk (evaluation.LOGIT_CHUNK)

if TYPE_CHECKING:
    from ..config import PruneConfig


class InsufficientMemory(MemoryError):
    """A run would not fit; the message says how much it needs and which flags lower it."""


@dataclass
class Estimate:
    """Bytes a run needs beyond the loaded model, by part."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        big = sorted(self.parts.items(), key=lambda kv: -kv[1])[:3]
        return ", ".join(f"{name} {size / GIB:.1f}" for name, size in big)


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _ffn_width(model: nn.Module, blocks_path: str) -> int:
    block = model.get_submodule(blocks_path)[0]
    widths = [linear_weight(m).shape[1] for _, m in block.named_modules() if hasattr(m, "weight")
              and getattr(m, "weight") is not None and getattr(m.weight, "dim", lambda: 0)() == 2]
    return max(widths) if widths else 0


def _most_heads(cfg) -> int:
    """The attention heads of a layer, the most of any layer where the config sets them per layer."""
    try:
        return getattr(cfg, "num_attention_heads", 1) or 1
    except RuntimeError:  # transformers' per-layer attributes refuse one value for the model
        return max((getattr(layer, "num_attention_heads", 1) or 1 for layer in getattr(cfg, "per_layer_config", ())),
                   default=1)


def estimate(model: nn.Module, blocks_path: str, config: PruneConfig, windows: torch.Tensor,
             holdout: torch.Tensor) -> Estimate:
    """What ``prune`` will hold for ``model`` (its stack of blocks at ``blocks_path``) under ``config`` with
    these calibration windows (only their shapes are read)."""
    cfg = blocks_config(model, blocks_path)
    hidden = cfg.hidden_size
    layers = len(model.get_submodule(blocks_path))
    ffn = _ffn_width(model, blocks_path)
    heads = _most_heads(cfg)
    dtype_bytes = next(model.parameters()).element_size()
    count, seqlen = windows.shape[0] + holdout.shape[0], windows.shape[1]
    stream = count * seqlen * hidden * dtype_bytes
    est = Estimate()
    batch = config.calibration.batch_size
    est.parts["one block's forward"] = batch * seqlen * (4 * hidden + 3 * ffn + heads * seqlen) * 4
    linears = sum(linear_weight(m).numel() for name, m in model.named_modules()
                  if name.startswith(blocks_path + ".") and hasattr(m, "weight")
                  and getattr(m.weight, "dim", lambda: 0)() == 2)

    def activations(b: int) -> int:  # one block's training graph at ``b`` windows
        return (b * seqlen * (ACT_PER_HIDDEN * hidden + ACT_PER_FFN * ffn) * 4
                + ATTENTION_COPIES * b * heads * seqlen * seqlen * 4)

    learned = config.learned
    if learned is not None and learned.scope == "e2e":
        est.parts["hidden states"] = 2 * stream
        b = learned.windows_per_step
        est.parts["relaxed weights"] = linears * (dtype_bytes + 1)
        if learned.recompute:  # each block's input kept, one block's activations at a time
            est.parts["training activations"] = (layers + 1) * b * seqlen * hidden * 4 + activations(b)
        else:
            est.parts["training activations"] = layers * activations(b)
        est.parts["dense hidden states"] = (layers + 1) * b * seqlen * hidden * 4
        est.parts["held-out dense states"] = (layers + 1) * holdout.shape[0] * seqlen * hidden * 4
        est.parts["logits"] = LOGIT_CHUNK_BYTES
    else:
        compensating = (learned is None and config.permutation.method == "output" and config.permutation.compensate
                        and config.calibration.propagate == "pruned")
        est.parts["hidden states"] = (3 if compensating else 2) * stream
        if config.start == "output":
            est.parts["statistics"] = 4 * max(hidden, ffn) ** 2 * 8 * (2 if compensating else 1)
    if config.distill.steps:  # dense copy, gradient, AdamW's two moments and the best weights; masks
        b = config.distill.batch
        est.parts["distillation weights"] = linears * (5 * dtype_bytes + 1)
        est.parts["distillation activations"] = (layers * activations(b) + (layers + 1) * b * seqlen * hidden * 4
                                                 + LOGIT_CHUNK_BYTES)
    return est


def resident_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (a tensor shared by two modules counted once)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def needs_offload(model: nn.Module, blocks_path: str, config: PruneConfig, windows: torch.Tensor,
                  holdout: torch.Tensor, device: torch.device) -> bool:
    """Whether ``model`` and what the run holds beside it (:func:`estimate`) exceed ``device``'s free memory,
    so the blocks must wait on the host (:mod:`permsparse.run.placement`)."""
    if device.type != "cuda":
        return False
    return resident_bytes(model) + estimate(model, blocks_path, config, windows, holdout).total > available_bytes(device)


def _lighter(config: PruneConfig) -> list[tuple[str, PruneConfig]]:
    """Changes of ``config`` that lower what a run holds, lightest first, each with the flags that make it."""
    learned = config.learned
    options = []
    if learned is not None and learned.scope == "e2e":
        if not learned.recompute:
            options.append(("--recompute", replace(config, permutation=replace(learned, recompute=True))))
        if learned.windows_per_step > 1:
            flags = "--batch 1" if learned.recompute else "--recompute --batch 1"
            options.append((flags, replace(config, permutation=replace(learned, batch=1, recompute=True))))
        options.append(("--scope blockwise", replace(config, permutation=replace(learned, scope="blockwise", batch=0))))
    if config.distill.steps and config.distill.batch > 1:
        options.append(("--distill-batch 1", replace(config, distill=replace(config.distill, batch=1))))
    return options


def check_memory(model: nn.Module, blocks_path: str, config: PruneConfig, windows: torch.Tensor,
                 holdout: torch.Tensor, device: torch.device | None = None, offload: bool = False) -> Estimate:
    """Stop before any heavy work when the estimate exceeds the memory available on ``device`` (the
    model's, by default). The model is where it computes already; an ``offload``-ed one brings one block
    at a time to the device, which the estimate adds. The message names the flags that would make the
    run fit, where one of them does."""
    device = next(model.parameters()).device if device is None else device
    est = estimate(model, blocks_path, config, windows, holdout)
    if offload:
        est.parts["one block"] = resident_bytes(model.get_submodule(blocks_path)[0])
    free = available_bytes(device)
    if est.total <= free:
        return est
    fitting = [flags for flags, lighter in _lighter(config)
               if estimate(model, blocks_path, lighter, windows, holdout).total + est.parts.get("one block", 0) <= free]
    if fitting:
        advice = f"{fitting[0]} would fit"
    else:
        advice = "lower --nsamples or --seqlen"
        if config.learned is not None and config.learned.scope == "e2e":
            advice = "lower --batch (windows per step) or --seqlen, or use --scope blockwise"
        if config.distill.steps:
            advice += "; lower --distill-batch, or prune without --distill-steps"
    if device.type == "cuda":
        advice += "; on several GPUs (torchrun) each process holds its share of the windows"
    raise InsufficientMemory(
        f"this run needs about {est.total / GIB:.1f} GiB beyond the model ({est.describe()} GiB) and "
        f"{free / GIB:.1f} GiB are available on {device}: {advice}")
