"""The towers of a vision-language model: the language model and the vision encoder, each pruned on its own.

A vision-language model (LLaVA, Qwen2-VL, Idefics3, Gemma 3, PaliGemma, ...) is a vision tower, a projector
and a language model. transformers says which part is which on every such class: ``get_decoder()`` is the
language model and ``get_encoder(modality="image")`` the vision tower; for a model of one modality the
latter is the model itself, so no table of classes is kept. The language tower is pruned inside the whole
model (its blocks run on text, its output is the model's logits); the vision tower as a model of its own
that reads pixel values. The projector and the embeddings stay dense.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

TOWERS = ("language", "vision")


class TowerError(ValueError):
    """A tower that cannot be pruned, named with the reason (one line)."""


@dataclass(frozen=True)
class Towers:
    """Where the two towers of a vision-language model live (full module names)."""

    language: str
    vision: str

    def path(self, tower: str) -> str:
        return self.language if tower == "language" else self.vision


def find_towers(model: nn.Module) -> Towers | None:
    """The language and vision towers of ``model``, or None for a model of one modality."""
    try:
        decoder, encoder = model.get_decoder(), model.get_encoder(modality="image")
    except (AttributeError, TypeError, ValueError, NotImplementedError):
        return None
    names = {module: name for name, module in model.named_modules()}
    if encoder is model or encoder is decoder or encoder not in names or decoder not in names:
        return None
    language, vision = names[decoder], names[encoder]
    if not language or not vision or language.startswith(vision + ".") or vision.startswith(language + "."):
        return None
    return Towers(language, vision)


def reads_pixels(module: nn.Module) -> bool:
    """Whether ``module``'s forward pass takes images as its first input (``pixel_values``)."""
    parameters = list(inspect.signature(module.forward).parameters)
    return bool(parameters) and parameters[0] == "pixel_values"


def main_input(model: nn.Module) -> str:
    """The name of ``model``'s main input: ``pixel_values`` for a model whose forward pass starts with
    images (some vision towers still name ``input_ids`` as their main input), else what it names."""
    return "pixel_values" if reads_pixels(model) else getattr(model, "main_input_name", "input_ids")


def vision_tower(model: nn.Module) -> tuple[str, nn.Module]:
    """The vision tower of a vision-language model, as a model of its own that reads pixel values;
    :class:`TowerError` says why when there is none such."""
    towers = find_towers(model)
    if towers is None:
        raise TowerError(f"{type(model).__name__} has no vision tower (not a vision-language model)")
    tower = model.get_submodule(towers.vision)
    if not reads_pixels(tower):
        first = next(iter(inspect.signature(tower.forward).parameters), "nothing")
        raise TowerError(f"{towers.vision} ({type(tower).__name__}) reads {first}, not images (pixel_values): "
                         "pruning this vision tower is not supported; --towers language prunes the language model")
    if not hasattr(tower, "config"):
        raise TowerError(f"{towers.vision} ({type(tower).__name__}) has no config of its own")
    return towers.vision, tower


def mapped_classes(mapping) -> set[str]:
    """Every class name of one of transformers' auto mappings (a value is one name or a tuple of names)."""
    names = set()
    for value in mapping.values():
        names.update((value,) if isinstance(value, str) else value)
    return names


def vlm_classes() -> set[str]:
    """Names of the Hugging Face vision-language classes (``LlavaForConditionalGeneration``, Qwen2-VL, ...)."""
    return mapped_classes(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)


def is_vlm(model: nn.Module) -> bool:
    """Whether ``model`` is a vision-language model: images and text in, text out."""
    return type(model).__name__ in vlm_classes()
