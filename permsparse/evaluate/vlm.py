"""Zero-shot image classification and caption perplexity of a vision-language model on CIFAR-10's test split.

For each image the model reads a prompt (:data:`PROMPT`: SmolLM2's chat format, the image in the user's
turn, the one the testbed of :mod:`permsparse.models.vlm_testbed` is trained on) and the caption up to the class
name (``"a photo of a"``); each of the ten class names is scored by the sum of
the log-probabilities of its tokens there, and the answer is the name scored highest (ten-way accuracy).
The caption perplexity is that of the whole true caption (``"a photo of a cat."``), over its tokens.
The image and the shared text run once per image, the ten continuations then from its key-value cache.
Images are drawn from CIFAR-10's test split (``cifar10-test``), which the testbed never trains, calibrates
or chooses anything on; ``limit`` scores that many of them, drawn at random (seeded, the same every time).
"""
from __future__ import annotations

import inspect
import math
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from ..data.images import Images, load_images, preprocess
from ..run.progress import bar

from ..config import VLM_TASK as TASK
SOURCE = "cifar10-test"
PROMPT = "<|im_start|>user\n<image>\nWhat is in this picture?<|im_end|>\n<|im_start|>assistant\n"
CAPTION = "a photo of a {}."  # the class name where {} is; its words are tokenised piece by piece


class Wording(Protocol):
    """The text around the image: the prompt (with the image placeholder) and the caption (``{}``: the
    class name); a testbed's recipe carries both."""

    prompt: str
    caption: str


@dataclass(frozen=True)
class TaskWording:
    prompt: str = PROMPT
    caption: str = CAPTION


WORDING = TaskWording()


@dataclass(frozen=True)
class Text:
    """Token ids of the text around the image: the processor's context (the prompt with the image tokens
    expanded, then the caption up to the class name), each class name's ids, and the ids after the name."""

    context: list[int]  # prompt and caption prefix, the image tokens expanded
    caption_start: int  # where the caption begins in ``context``
    names: list[list[int]]  # each class name's ids (with its leading space)
    end: list[int]  # the caption after the name ("."); may be empty

    def caption(self, label: int) -> list[int]:
        """The ids of the whole caption of class ``label`` (the part of the context and the rest)."""
        return self.context[self.caption_start:] + self.names[label] + self.end


def caption_parts(recipe: Wording) -> tuple[str, str]:
    """The caption before and after the class name: ``("a photo of a", ".")``."""
    before, after = recipe.caption.split("{}")
    return before.rstrip(" "), after


def text_ids(processor, classes: list[str], recipe: Wording = WORDING, image=None) -> Text:
    """The :class:`Text` of ``recipe`` for ``processor`` (``image``: any image of the right size, for the
    processor to count its tokens; a blank one of the image processor's size by default)."""
    import numpy as np

    if image is None:
        size = _image_size(processor)
        image = np.zeros((size, size, 3), dtype=np.uint8)
    before, after = caption_parts(recipe)
    tokenizer = processor.tokenizer
    prompt = processor(text=recipe.prompt, images=image, return_tensors="pt")["input_ids"][0].tolist()
    context = processor(text=recipe.prompt + before, images=image, return_tensors="pt")["input_ids"][0].tolist()
    if context[:len(prompt)] != prompt:
        raise ValueError("the caption prefix changes how the prompt tokenises; end the prompt with a separator")
    names = [tokenizer(" " + name, add_special_tokens=False)["input_ids"] for name in classes]
    end = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    return Text(context, len(prompt), names, end)


def _image_size(processor) -> int:
    size = getattr(processor.image_processor, "size", None) or {}
    return int(size.get("height", 32)) if isinstance(size, dict) else 32




@dataclass
class VLMAccuracy:
    """Ten-way accuracy (a fraction) of the likeliest class name and the true caption's perplexity over
    ``images`` images of ``source``."""

    accuracy: float
    caption_ppl: float
    images: int
    source: str
    seconds: float


@torch.no_grad()
def score_batch(model, pixel_values: torch.Tensor, text: Text) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a batch of preprocessed images: each class name's summed token log-probability ``(B, C)``,
    the log-probability of each class's whole caption ``(B, C)`` and its token count ``(C,)``."""
    parameter = next(model.parameters())
    device = parameter.device
    count, classes = pixel_values.shape[0], len(text.names)
    ids = torch.tensor(text.context, device=device).expand(count, -1)
    keep = len(text.context) - text.caption_start + 1
    out = model(input_ids=ids, pixel_values=pixel_values.to(device, parameter.dtype), use_cache=True,
                logits_to_keep=keep)
    logp = out.logits.float().log_softmax(-1)  # (B, keep, V): the caption's shared words, then the first name token
    shared = torch.tensor(text.context[text.caption_start:], device=device)
    shared_lp = logp[:, :-1].gather(-1, shared.expand(count, -1)[..., None]).squeeze(-1).sum(-1)
    rows = [name + text.end for name in text.names]
    width = max(map(len, rows))
    tokens = torch.zeros(classes, width, dtype=torch.long, device=device)
    for c, row in enumerate(rows):
        tokens[c, :len(row)] = torch.tensor(row, device=device)
    token_lp = logp[:, -1][:, tokens[:, 0]][..., None]  # (B, C, 1): the first token of each continuation
    if width > 1:
        cache = out["cache"] if "cache" in out else out["past_key_values"]
        cache.batch_repeat_interleave(classes)
        later = model(input_ids=tokens[:, :-1].repeat(count, 1), **{_cache_argument(model): cache},
                      use_cache=True).logits
        later = later.float().log_softmax(-1).view(count, classes, width - 1, -1)
        later_lp = later.gather(-1, tokens[None, :, 1:, None].expand(count, -1, -1, 1)).squeeze(-1)
        token_lp = torch.cat([token_lp, later_lp], dim=-1)
    position = torch.arange(width, device=device)
    name_len = torch.tensor([len(n) for n in text.names], device=device)
    row_len = torch.tensor([len(r) for r in rows], device=device)
    names = (token_lp * (position < name_len[:, None])).sum(-1)
    captions = shared_lp[:, None] + (token_lp * (position < row_len[:, None])).sum(-1)
    return names, captions, row_len + len(shared)


def _cache_argument(model) -> str:
    """The forward pass's name of the key-value cache (``past_key_values`` before transformers 5.40)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def evaluate(model, processor, images: Images | str = SOURCE, *, recipe: Wording = WORDING, limit: int | None = None,
             index: torch.Tensor | None = None, batch_size: int = 32, progress: bool = True) -> VLMAccuracy:
    """Ten-way accuracy and caption perplexity of ``model`` (with its ``processor``) on ``images`` (a source
    name, CIFAR-10's test split by default; ``index``: only those of its images, such as validation images of
    a training split); with ``limit``, on that many of them drawn at random (seeded)."""
    started = time.perf_counter()
    source = images if isinstance(images, str) else "given images"
    if isinstance(images, str):
        images = load_images(images)
    order = torch.arange(len(images)) if index is None else index.sort().values
    if limit is not None and limit < len(order):
        order = order[torch.randperm(len(order), generator=torch.Generator().manual_seed(0))[:limit].sort().values]
    if len(order) == 0:
        raise ValueError(f"no images of {source} to evaluate")
    text = text_ids(processor, images.classes, recipe)
    correct, nll, tokens = 0, 0.0, 0
    for s in bar(range(0, len(order), batch_size), desc=f"{TASK} ({source})", disable=not progress):
        index = order[s:s + batch_size]
        names, captions, lengths = score_batch(model, preprocess(processor.image_processor, images, index), text)
        labels = images.labels[index].to(names.device)
        correct += int((names.argmax(-1) == labels).sum())
        nll -= float(captions.gather(1, labels[:, None]).sum())
        tokens += int(lengths[labels].sum())
    return VLMAccuracy(correct / len(order), math.exp(nll / tokens), len(order), source, time.perf_counter() - started)
