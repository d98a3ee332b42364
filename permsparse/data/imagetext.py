"""Image-text calibration windows for a vision-language model's language tower.

A source such as ``cifar10-captions`` gives windows of images and text as the model's processor builds
them: each image with a question and its caption (``a photo of a {class}.``), in the processor's chat
template where it has one, with the image's placeholder tokens expanded. Pairs are packed one after the
other into windows of ``seqlen`` tokens; the rest of a window that holds no further whole pair is the text
of the next pair without its image (its caption first). Held-out windows use images the training windows do not.

The pipeline handles windows as token ids only. The images ride along in :func:`images_attached`: while
it is active, a hook on the model's base model adds to every call on token ids the image inputs of the
windows in the batch (pixel values and whatever else the processor made: grids, token types), looked up
by each window's ids, which are unique. Statistics, the learned permutation's objective and its judgment,
and distillation then see the image features in the stream, as the model does when it runs.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .images import load_images, sample

QUESTION = "What is in this picture?"
CAPTION = "a photo of a {}."
SOURCES = {"cifar10-captions": "cifar10"}  # image-text source: the image source of its images (training split)
REPEATS = 100  # a window whose text repeats an earlier one's is drawn again, up to this many times in a row


def is_image_text_source(source: str) -> bool:
    return source in SOURCES


def require_processor(preprocessor, purpose: str):
    """``preprocessor`` when it is a vision-language model's processor (it has an image processor); else a
    one-line error saying that ``purpose`` needs one and, for a tokenizer loaded in its place, why the processor
    could not be built (its ``processor_error``)."""
    if getattr(preprocessor, "image_processor", None) is not None:
        return preprocessor
    reason = getattr(preprocessor, "processor_error", None)
    why = (f"its processor could not be built here ({reason})" if reason
           else f"{type(preprocessor).__name__} is no processor")
    raise ValueError(f"{purpose} needs the model's processor (its image processor and tokenizer), and {why}: "
                     "calibrate the language tower on text, or run where the processor can be built")


@dataclass
class ImageTextWindows:
    """Token ids ``(N, seqlen)``, per window its image inputs (keyed by the processor's names), and the
    indices in the image source of every image the windows hold (what an evaluation on the same split leaves
    out)."""

    ids: torch.Tensor
    images: list[dict[str, torch.Tensor]] = field(default_factory=list)
    index: list[int] = field(default_factory=list)


def pair_text(processor, caption: str) -> str:
    """One image, the question and its caption as the model reads them: its processor's chat template when it
    has one (with the image as a part of the user's turn, or, for a template of text turns, its placeholder
    at the start of the user's text), else the image placeholder, the question and the caption on lines of
    their own."""
    token = getattr(processor, "image_token", None)
    if not token:
        raise ValueError(f"{type(processor).__name__} names no image token: image-text calibration cannot place the "
                         "image")
    if getattr(processor, "chat_template", None):
        from jinja2 import TemplateError  # what renders chat templates

        turns = ([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
                  {"role": "assistant", "content": [{"type": "text", "text": caption}]}],
                 [{"role": "user", "content": f"{token}\n{QUESTION}"}, {"role": "assistant", "content": caption}])
        for messages in turns:
            try:
                text = processor.apply_chat_template(messages, tokenize=False)
            except (TypeError, ValueError, TemplateError):  # a template of text turns reads no parts
                continue
            if token in text:
                return text
    return f"{token}\n{QUESTION}\n{caption}"


def _row_shaped(value: torch.Tensor, length: int) -> bool:
    """Whether a processor output holds one value per token (token types), not per image."""
    return value.dim() == 2 and value.shape == (1, length)


def _window(processor, pairs, seqlen: int, source: str) -> tuple[torch.Tensor, dict, list[int]]:
    """One window of ``seqlen`` tokens from the next (index, image, caption) triples of the iterator ``pairs``:
    its ids, its image inputs and the indices of its images. The pair whose image does not fit gives the
    window's rest its text and is used up."""
    ids, parts, placed = [], [], []
    for index, pixels, caption in pairs:
        out = processor(text=pair_text(processor, caption), images=[pixels.permute(1, 2, 0).numpy()],
                        return_tensors="pt")
        pair_ids = out.pop("input_ids")[0]
        out.pop("attention_mask", None)
        if len(pair_ids) > seqlen:
            raise ValueError(f"--seqlen {seqlen} is shorter than one image with its caption ({len(pair_ids)} tokens)")
        if sum(map(len, ids)) + len(pair_ids) > seqlen:
            rest = seqlen - sum(map(len, ids))
            text = processor.tokenizer(f"{caption}\n{QUESTION}", add_special_tokens=False, return_tensors="pt")
            ids.append(text["input_ids"][0].repeat(rest)[:rest])  # the next pair's text, without its image
            parts.append(None)
            break
        ids.append(pair_ids)
        parts.append(dict(out))
        placed.append(index)
    else:
        raise ValueError(f"{source} has too few images for the windows asked for: lower --nsamples or --holdout")
    # token-wise inputs (token types) span the window: each pair's own, zeros where there is no image
    row_keys = {key for part, pair_ids in zip(parts, ids) if part for key, value in part.items()
                if _row_shaped(value, len(pair_ids))}
    window = {}
    for key in {key for part in parts if part for key in part}:
        if key in row_keys:
            window[key] = torch.cat([part[key] if part and key in part else
                                     torch.zeros(1, len(pair_ids), dtype=torch.long)
                                     for part, pair_ids in zip(parts, ids)], dim=1)
        else:
            window[key] = torch.cat([part[key] for part in parts if part and key in part])
    return torch.cat(ids), window, placed


def draw_image_text(processor, source: str, nsamples: int, seqlen: int, seed: int,
                    holdout: int = 0) -> tuple[ImageTextWindows, ImageTextWindows]:
    """``nsamples`` training windows and ``holdout`` held-out ones of an image-text ``source``, packed from
    seeded random images of its training split (disjoint between the two) and their captions."""
    if source not in SOURCES:
        raise ValueError(f"unknown image-text source {source!r}; one of {', '.join(SOURCES)}")
    require_processor(processor, f"image-text calibration ({source})")
    images = load_images(SOURCES[source])
    order = sample(len(images), len(images), seed)
    captions = [CAPTION.format(name) for name in images.classes]
    pairs = ((int(i), images.pixels[int(i)], captions[int(images.labels[int(i)])]) for i in order)
    drawn, seen = [], set()
    for count in (nsamples, holdout):
        windows = ImageTextWindows(torch.zeros(0, seqlen, dtype=torch.long))
        ids = []
        repeats = 0
        while len(ids) < count:
            window_ids, window_images, placed = _window(processor, pairs, seqlen, source)
            if _key(window_ids) in seen:  # its images are found by its tokens: a repeated text is drawn again
                repeats += 1
                if repeats < REPEATS:
                    continue
                raise ValueError(f"image-text windows of {seqlen} tokens keep repeating their text: use a longer "
                                 "--seqlen")
            repeats = 0
            seen.add(_key(window_ids))
            ids.append(window_ids)
            windows.images.append(window_images)
            windows.index.extend(placed)
        if ids:
            windows.ids = torch.stack(ids)
        drawn.append(windows)
    return drawn[0], drawn[1]


def _key(row: torch.Tensor) -> bytes:
    return row.detach().to("cpu", torch.long).numpy().tobytes()


def image_table(*windows: ImageTextWindows) -> dict[bytes, dict[str, torch.Tensor]]:
    """Each window's image inputs by its ids; windows whose ids are equal must have the same images."""
    table: dict[bytes, dict[str, torch.Tensor]] = {}
    for part in windows:
        for row, images in zip(part.ids, part.images):
            key = _key(row)
            if key in table and any(not torch.equal(table[key][k], images[k]) for k in images):
                raise ValueError("two image-text windows have the same tokens but different images")
            table[key] = images
    return table


def _batch_images(table: dict, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    rows = [table.get(_key(row)) for row in ids]
    if not any(rows):
        return {}
    length = ids.shape[1]
    keys = {key for row in rows if row for key in row}
    out = {}
    for key in keys:
        row_wise = any(row and key in row and _row_shaped(row[key], length) for row in rows)
        if row_wise:
            out[key] = torch.cat([row[key] if row and key in row else torch.zeros(1, length, dtype=torch.long)
                                  for row in rows])
        else:
            out[key] = torch.cat([row[key] for row in rows if row and key in row])
    return out


@contextmanager
def images_attached(model: nn.Module, table: dict[bytes, dict[str, torch.Tensor]]):
    """While inside, every call of ``model``'s base model on token ids of windows in ``table`` (from
    :func:`image_table`) also gets their image inputs, on the ids' device (floating ones in the model's dtype)."""
    if not table:
        yield
        return
    base = model.base_model
    dtype = next(model.parameters()).dtype

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None or kwargs.get("pixel_values") is not None:
            return None
        extra = _batch_images(table, ids)
        for key, value in extra.items():
            kwargs[key] = value.to(ids.device, dtype if value.is_floating_point() else value.dtype)
        return args, kwargs

    handle = base.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
