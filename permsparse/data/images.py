"""Labelled images for vision Transformers: CIFAR-10 and class-per-folder trees, and top-k accuracy.

A source is ``cifar10`` (the training split for calibration, ``cifar10-test`` for evaluation, read from
the JPEG zips under the data folder) or ``imagefolder:PATH`` (one sub-folder per class, sorted by name,
as ImageNet is laid out). Images are decoded once and preprocessed with the model's own image processor
(resize, rescale, normalise), so calibration and evaluation see what the model was trained on.

Calibration draws seeded random images of a source, and held-out images disjoint from them on which a
learned permutation is judged; a pruned model is then judged on images calibration never saw: CIFAR-10's
test split for its training split, the rest of an image folder otherwise.
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .text import data_dirs
from ..discover import main_input
from ..discover.towers import mapped_classes

CIFAR10 = {"cifar10": ("cifar10/cifar10_train_jpg.zip", "train"), "cifar10-test": ("cifar10/cifar10_test_jpg.zip", "test")}
TEST_SPLITS = {"cifar10": "cifar10-test"}  # a calibration split and the evaluation split beside it
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


@dataclass
class Images:
    """Decoded images (uint8, ``(N, 3, H, W)`` when they share a size, else a list) and their labels."""

    pixels: torch.Tensor | list[torch.Tensor]
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def is_image_source(source: str) -> bool:
    return source in CIFAR10 or source.startswith("imagefolder:")


def reads_images(model: nn.Module) -> bool:
    """Whether ``model``'s main input is pixel values (a vision Transformer)."""
    return main_input(model) == "pixel_values"


def classifier_classes() -> set[str]:
    """Names of the Hugging Face image classification classes (``ViTForImageClassification``, DeiT, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    return mapped_classes(MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES)


def is_classifier(model: nn.Module) -> bool:
    """Whether ``model`` is an image classifier: its logits score classes of whole images."""
    return reads_images(model) and type(model).__name__ in classifier_classes()


def _decode(data: bytes, where: str) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data)).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"{where} is not a readable image ({type(err).__name__})") from None
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(image.height, image.width, 3).permute(2, 0, 1)


def _stack(pixels: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
    return torch.stack(pixels) if len({tuple(p.shape) for p in pixels}) == 1 else pixels


def _cifar10_listing(source: str) -> tuple[Path, list[str], list[str]]:
    """The zip of a CIFAR-10 split, its image names (sorted) and its classes."""
    relative, _ = CIFAR10[source]
    file = next((folder / relative for folder in data_dirs() if (folder / relative).is_file()), None)
    if file is None:
        raise FileNotFoundError(f"image source {source!r} is not reachable; tried: "
                                + "; ".join(str(folder / relative) for folder in data_dirs()))
    with zipfile.ZipFile(file) as archive:
        names = sorted(n for n in archive.namelist() if n.lower().endswith(IMAGE_SUFFIXES))
    return file, names, sorted({n.split("/")[1] for n in names})


def _folder_listing(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """The image files of a class-per-folder tree with their labels (sorted), and its classes."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
             if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise ValueError(f"image folder {root} holds no images in class sub-folders ({', '.join(IMAGE_SUFFIXES)})")
    return files, classes


def _source_kind(source: str) -> str:
    if source in CIFAR10:
        return "cifar10"
    if source.startswith("imagefolder:"):
        return "folder"
    raise FileNotFoundError(f"unknown image source {source!r}: use cifar10, cifar10-test or imagefolder:PATH")


def _folder_root(source: str) -> Path:
    return Path(source.split(":", 1)[1]).expanduser()


def image_count(source: str) -> int:
    """How many images ``source`` holds, from its listing alone (nothing is decoded)."""
    if _source_kind(source) == "cifar10":
        return len(_cifar10_listing(source)[1])
    return len(_folder_listing(_folder_root(source))[0])


def load_images(source: str) -> Images:
    """Every image of ``source`` with its label; one clear error naming what is missing or unreadable."""
    if _source_kind(source) == "cifar10":
        file, names, classes = _cifar10_listing(source)
        index = {c: i for i, c in enumerate(classes)}
        with zipfile.ZipFile(file) as archive:
            pixels = [_decode(archive.read(n), f"{file}:{n}") for n in names]
        return Images(_stack(pixels), torch.tensor([index[n.split("/")[1]] for n in names]), classes)
    files, classes = _folder_listing(_folder_root(source))
    pixels = [_decode(f.read_bytes(), str(f)) for f, _ in files]
    return Images(_stack(pixels), torch.tensor([label for _, label in files]), classes)


def sample(total: int, count: int, seed: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """``count`` indices of ``total`` images drawn without replacement (seeded), none of them in ``exclude``."""
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    if exclude is not None:
        order = order[~torch.isin(order, exclude)]
    if count > len(order):
        raise ValueError(f"{count} images asked for, {len(order)} available")
    return order[:count]


def preprocess(processor, images: Images, index: torch.Tensor) -> torch.Tensor:
    """``pixel_values`` of the indexed images through the model's image processor."""
    pixels = [images.pixels[int(i)] for i in index]
    return processor([p.permute(1, 2, 0).numpy() for p in pixels], return_tensors="pt")["pixel_values"]


Pair = tuple[torch.Tensor, torch.Tensor]


def draw_calibration(processor, source: str, nsamples: int, seed: int, holdout: int = 0, *,
                     allow_test: bool = False) -> tuple[Pair, Pair]:
    """``nsamples`` images of ``source`` drawn at random (seeded) and ``holdout`` more, disjoint from them,
    preprocessed: ``((pixels, held_pixels), (labels, held_labels))``. A test split is refused unless
    ``allow_test``."""
    if source in TEST_SPLITS.values() and not allow_test:
        raise ValueError(f"calibration source {source!r} is an evaluation split: calibrate on {', '.join(TEST_SPLITS)} "
                         "or an image folder, or pass --allow-test-calibration if you mean it")
    images = load_images(source)
    index = calibration_index(len(images), nsamples, holdout, seed)
    train, held = index[:nsamples], index[nsamples:]
    pixels = preprocess(processor, images, train)
    held_pixels = preprocess(processor, images, held) if holdout else pixels.new_zeros(0, *pixels.shape[1:])
    return (pixels, held_pixels), (images.labels[train], images.labels[held])


def calibration_index(total: int, nsamples: int, holdout: int, seed: int) -> torch.Tensor:
    """The indices of the calibration images, then of the held-out ones (:func:`draw_calibration`)."""
    if nsamples + holdout > total:
        raise ValueError(f"{nsamples} calibration and {holdout} held-out images asked for, the source holds "
                         f"{total}; lower --nsamples or --holdout")
    return sample(total, nsamples + holdout, seed)


def evaluation_images(source: str, nsamples: int, holdout: int, seed: int) -> tuple[str, torch.Tensor | None]:
    """Where a model calibrated on ``source`` is judged on images calibration never saw, and which of
    them to leave out: the test split beside a training split; an image folder without its calibration
    and held-out draw."""
    if source in TEST_SPLITS:
        return TEST_SPLITS[source], None
    return source, calibration_index(image_count(source), nsamples, holdout, seed)


@dataclass
class Accuracy:
    """Top-1 and top-5 accuracy (fractions) over ``images`` images of ``source``."""

    top1: float
    top5: float
    images: int
    source: str
    seconds: float


@torch.no_grad()
def accuracy(model: nn.Module, processor, source: str, *, limit: int | None = None, exclude: torch.Tensor | None = None,
             batch_size: int = 256, progress: bool = True) -> Accuracy:
    """Top-1/top-5 accuracy of an image classifier on ``source``: its images, those in ``exclude`` left out;
    with ``limit``, that many of them drawn at random (seeded, the same every time), since a source lists
    its images class by class."""
    import time

    from ..run.progress import bar

    started = time.perf_counter()
    images = load_images(source)
    order = torch.arange(len(images))
    if exclude is not None:
        order = order[~torch.isin(order, exclude)]
    if limit is not None and limit < len(order):
        order = order[torch.randperm(len(order), generator=torch.Generator().manual_seed(0))[:limit].sort().values]
    count = len(order)
    if count == 0:
        raise ValueError(f"no images of {source} left to evaluate")
    parameter = next(model.parameters())
    top1 = top5 = 0
    for s in bar(range(0, count, batch_size), desc=f"accuracy ({source})", disable=not progress):
        index = order[s:s + batch_size]
        pixels = preprocess(processor, images, index).to(parameter.device, parameter.dtype)
        logits = model(pixel_values=pixels).logits
        labels = images.labels[index].to(parameter.device)
        best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        top1 += int((best[:, 0] == labels).sum())
        top5 += int((best == labels[:, None]).any(-1).sum())
    return Accuracy(top1 / count, top5 / count, count, source, time.perf_counter() - started)
