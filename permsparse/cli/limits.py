"""Limits a command checks once the model is loaded and before any heavy work: its context, its output size.

The memory a run holds is :mod:`permsparse.run.memory`'s; these are the other limits a long run would
otherwise meet late: a sequence longer than the model's positions (``prune --seqlen``, ``eval
--seqlen``), and an output larger than the free space of the disk it goes to.
"""
from __future__ import annotations

from torch import nn

from ..config import PruneConfig
from ..data.images import reads_images
from ..run.memory import resident_bytes

CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(model: nn.Module) -> tuple[int, str] | None:
    """The longest sequence ``model`` has positions for, and the config field that says so; None when its
    config says nothing (an image model)."""
    config = model.config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return None


def check_context(model: nn.Module, seqlen: int, flag: str) -> None:
    """Refuse windows of ``seqlen`` tokens longer than ``model``'s context."""
    if reads_images(model):
        return
    context = context_length(model)
    if context is not None and seqlen > context[0]:
        raise ValueError(f"{flag} {seqlen} is longer than {type(model).__name__}'s context of {context[0]} tokens "
                         f"({context[1]} in its config): use {flag} {context[0]} or less")


def output_bytes(model: nn.Module, config: PruneConfig) -> int:
    """About what a run writes: the checkpoint (the model's weights as they are) and, while it runs, its
    progress (two steps of the calibration windows' hidden states and bit-packed masks, and the updated
    weights of a weight-updating host)."""
    weights = resident_bytes(model)
    progress = 0
    if not reads_images(model):
        config_ = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        hidden = getattr(config_, "hidden_size", 0) or 0
        element = next(model.parameters()).element_size()
        windows = config.calibration.nsamples + (config.calibration.holdout if config.judged else 0)
        progress = 2 * windows * config.calibration.seqlen * hidden * element
    progress += weights // 8 + (weights if config.updates else 0)
    return weights + progress
