"""The calibration set of a pruning run: the windows it calibrates on, those a learned permutation and
distillation are judged on, the labels of images, distillation's fresh windows, and the image inputs of
image-text windows. Each part of a calibration mixture gives its share of the windows.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..discover.towers import is_vlm
from ..run import distributed
from ..run.cache import cache_dir
from ..run.identity import hash_file_into
from . import images, text as texts
from .imagetext import ImageTextWindows, draw_image_text, image_table, is_image_text_source, require_processor

if TYPE_CHECKING:
    from ..config import PruneConfig


@dataclass
class CalibrationSet:
    """What a run calibrates on: training windows, held-out windows (a learned permutation's and
    distillation's judgment), the class labels of both for images, and distillation's windows (fresh
    windows of the calibration text; the training windows when those were given, or are images)."""

    windows: torch.Tensor
    holdout: torch.Tensor
    labels: tuple[torch.Tensor, torch.Tensor] | None
    distill: torch.Tensor
    distill_labels: torch.Tensor | None
    images: dict = field(default_factory=dict)  # image inputs of image-text windows, by their ids (imagetext)


def calibration(model: nn.Module, tokenizer, config: PruneConfig, windows: torch.Tensor | None,
                holdout: torch.Tensor | None, labels: tuple[torch.Tensor, torch.Tensor] | None,
                show: bool = True) -> CalibrationSet:
    """The training windows and, for a learned permutation or distillation, the held-out windows they are
    judged on; for images, their labels too (drawn with them, or as given); distillation's windows."""
    calib = config.calibration
    wanted = calib.holdout if config.judged else 0
    extra, table = None, {}
    if windows is None:
        if images.reads_images(model) != images.is_image_source(calib.source):
            kind = "images (--calib cifar10 or imagefolder:PATH)" if images.reads_images(model) else "text"
            raise ValueError(f"{type(model).__name__} calibrates on {kind}, not {calib.source!r}")
        if images.is_image_source(calib.source):
            (windows, holdout), labels = images.draw_calibration(tokenizer, calib.source, calib.nsamples, calib.seed,
                                                                 wanted, allow_test=calib.allow_test_text)
        else:
            windows, holdout, extra, table = text_windows(model, tokenizer, config, wanted, show)
    if holdout is None or not wanted:
        holdout = windows.new_zeros(0, *windows.shape[1:])
        labels = None if labels is None else (labels[0], labels[1][:0])
    if wanted and len(holdout) == 0:
        raise ValueError("a learned permutation or distillation is judged on held-out windows: give holdout windows "
                         "(or --holdout > 0)")
    if extra is not None and len(extra):
        return CalibrationSet(windows, holdout, labels, extra, None, table)
    return CalibrationSet(windows, holdout, labels, windows, None if labels is None else labels[0], table)


def text_windows(model: nn.Module, tokenizer, config: PruneConfig, wanted: int,
                 show: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """Training, held-out and distillation windows of the calibration text, and the image inputs of those
    that are image-text windows (:mod:`.imagetext`; ``tokenizer`` is then the model's processor).
    Each part of a mixture gives its share of the windows, the text parts first; distillation's extra windows
    come from the text parts."""
    calib = config.calibration
    text, paired, shares = _mixture_shares(calib.source, calib.nsamples, wanted)
    if paired and is_vlm(model):  # refused before the text is drawn
        require_processor(tokenizer, f"image-text calibration ({paired[0][0]})")
    counts = [sum(share[:len(text)]) for share in shares]
    windows = holdout = torch.zeros(0, calib.seqlen, dtype=torch.long)
    extra = None
    if text:
        source = ",".join(f"{name}:{weight:g}" for name, weight in text)
        windows, holdout = texts.draw_calibration(texts.text_tokenizer(tokenizer), source, counts[0], calib.seqlen,
                                                 calib.seed, counts[1], config.distill.windows if counts[0] else 0,
                                                 model=model, show=show, cache=cache_dir() / "samples",
                                                 sample=distributed.is_main(), temperature=calib.temperature)
        if calib.samples_text:  # sampled: rank 0's on every rank
            windows, holdout = distributed.broadcast(windows), distributed.broadcast(holdout)
        windows, extra = windows[:counts[0]], windows[counts[0]:]
    if paired and not is_vlm(model):
        raise ValueError(f"{type(model).__name__} reads no images: {paired[0][0]} calibrates vision-language models")
    drawn = image_text_draws(tokenizer, config, wanted)
    for part in drawn:
        windows, holdout = torch.cat([windows, part[0].ids]), torch.cat([holdout, part[1].ids])
    return windows, holdout, extra, image_table(*(half for part in drawn for half in part))


def _mixture_shares(source: str, nsamples: int, wanted: int):
    """A calibration mixture's text parts, its image-text parts, and each part's share of the training and of
    the held-out windows (text parts first)."""
    parts = texts.mixture(source)
    paired = [(name, weight) for name, weight in parts if is_image_text_source(name)]
    text = [(name, weight) for name, weight in parts if not is_image_text_source(name)]
    shares = [texts.shares(count, [w for _, w in text] + [w for _, w in paired]) for count in (nsamples, wanted)]
    return text, paired, shares


def image_text_draws(processor, config: PruneConfig, wanted: int) -> list[tuple[ImageTextWindows, ImageTextWindows]]:
    """The training and held-out windows (``wanted`` in all) of each image-text part of the calibration
    mixture, as :func:`text_windows` draws them."""
    calib = config.calibration
    text, paired, shares = _mixture_shares(calib.source, calib.nsamples, wanted)
    return [draw_image_text(processor, name, shares[0][len(text) + k], calib.seqlen, calib.seed + k,
                            shares[1][len(text) + k]) for k, (name, _) in enumerate(paired)]


def calibration_images(processor, config: PruneConfig) -> torch.Tensor:
    """Indices in their training split of every image the image-text calibration of ``config`` reads, its
    held-out windows' included (``calibration.holdout`` of them): the images an evaluation on that split
    leaves out."""
    drawn = image_text_draws(processor, config, config.calibration.holdout)
    return torch.tensor(sorted({i for part in drawn for half in part for i in half.index}), dtype=torch.long)


def source_digest(source: str) -> str:
    """sha256 of a calibration source: of every file its parts read (a text file, a named source's local
    copy), and of the names of parts read from elsewhere (the hub, images, text the model samples); an
    image folder by its files' paths and sizes."""
    digest = hashlib.sha256()
    if images.is_image_source(source):  # one image source: its name, and an image folder's files by path and size
        digest.update(source.encode())
        folder = Path(source.removeprefix("imagefolder:")).expanduser() if source.startswith("imagefolder:") else None
        if folder is not None and folder.is_dir():
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                digest.update(f"{path.relative_to(folder)}|{path.stat().st_size}|".encode())
        return digest.hexdigest()
    for name, weight in texts.mixture(source):
        digest.update(f"{name}:{weight!r}|".encode())
        path = Path(name).expanduser()
        if not path.is_file() and name in texts.SOURCES and texts.SOURCES[name].local:
            path = next((d / texts.SOURCES[name].local for d in texts.data_dirs() if (d / texts.SOURCES[name].local).is_file()), path)
        if path.is_file():
            hash_file_into(digest, path)
    return digest.hexdigest()
