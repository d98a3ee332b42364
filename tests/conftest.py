"""Shared fixtures: tiny random LLaMA models (with grouped-query attention) and a real tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# Calibration and held-out windows for the tiny models (vocabulary 512).
CALIB = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(1))
HOLDOUT = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))
INPUT = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(2))


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny tensors: many small operations run fastest, and alike on every machine, on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_llama(seed: int = 0, layers: int = 2, vocab: int = 512, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(seed: int = 0, tie: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=512, n_embd=64, n_head=4, n_layer=2, n_positions=64, n_inner=128,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie)
    return GPT2LMHeadModel(config).eval()


def tiny_opt(seed: int = 0, tie: bool = True, proj_dim: int = 64):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(seed)
    config = OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=128, num_attention_heads=4, num_hidden_layers=2,
                       max_position_embeddings=64, word_embed_proj_dim=proj_dim, tie_word_embeddings=tie)
    model = OPTForCausalLM(config).eval()
    with torch.no_grad():  # random biases and norm parameters, so a forgotten bias permutation shows
        for name, param in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def tiny_llama_random_norms(tie: bool = True):
    model = tiny_llama(tie=tie)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


BUILDERS = {"llama": tiny_llama_random_norms, "gpt2": tiny_gpt2, "opt": tiny_opt}


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    """A byte-level BPE tokenizer trained on Tiny Shakespeare (a real tokenizer, made offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = (DATA / "tinyshakespeare" / "input.txt").read_text()[:200_000]
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture()
def tiny_llama_dir(tmp_path, tiny_tokenizer):
    """A tiny random LLaMA with its tokenizer, saved as a Hugging Face folder."""
    folder = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


# Tiny random models of other families, built from their configs (hidden 64, 2 blocks, vocabulary 512).
FAMILY_OPTIONS = {
    "llama": None, "gpt2": None, "opt": None,  # the builders above
    "mistral": {"num_key_value_heads": 2},
    "qwen2": {"num_key_value_heads": 2},
    "qwen3": {"num_key_value_heads": 2, "head_dim": 16},
    "phi3": {"num_key_value_heads": 2},
    "gpt_neox": {},
    "olmo2": {"num_key_value_heads": 2},
    "falcon": {},  # multi-query attention and a parallel MLP that share one norm
    "bert": {},
    # families no adapter or test names otherwise: discovered as they are
    "gemma3_text": {"num_key_value_heads": 2, "head_dim": 16},  # q/k norms, norms around attention and MLP
    "phi": {},  # partial rotary, attention and MLP in parallel from one norm
    "cohere": {"num_key_value_heads": 2},  # parallel attention and gated MLP, logit scale
    "starcoder2": {"num_key_value_heads": 2},  # biases, ungated MLP
    "glm": {"num_key_value_heads": 2, "head_dim": 16},  # fused gate/up projection
}
ENCODERS = {"bert"}


def tiny_family(family: str, seed: int = 0, **options):
    """A tiny random model of ``family`` (a model type); encoders without a head. Norm parameters and
    biases are random, so a forgotten permutation of any of them shows."""
    if FAMILY_OPTIONS.get(family, {}) is None:
        return BUILDERS[family]()
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    torch.manual_seed(seed)
    sizes = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 1,
             "eos_token_id": 2}
    config = AutoConfig.for_model(family, **{**sizes, **FAMILY_OPTIONS.get(family, {}), **options})
    model = (AutoModel if family in ENCODERS else AutoModelForCausalLM).from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def tiny_vit(seed: int = 0, layers: int = 2):
    """A tiny random ViT image classifier (32x32 images, 8x8 patches, hidden 32, 2 heads, 10 classes) with
    random norm parameters and biases, so a forgotten permutation of any of them shows."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                       intermediate_size=64, num_labels=10)
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


# Calibration, held-out and input images for the tiny ViT, with labels.
PIXELS = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
PIXELS_HOLDOUT = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
PIXELS_INPUT = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
LABELS = (torch.arange(8) % 10, torch.arange(4) % 10)


def reload(folder):
    """A saved checkpoint loaded back with the auto class its config names."""
    from transformers import AutoConfig

    from permsparse.models.loading import auto_class

    return auto_class(AutoConfig.from_pretrained(folder)).from_pretrained(folder).eval()


def export_both_ways(model, config, report, tmp_path, output):
    """Export ``model`` masked and folded, check that each reloads to ``output(model)`` (masked exactly)
    and passes ``permsparse check``; return the folded checkpoint's fold record."""
    from permsparse import ExportConfig, check_checkpoint, export_checkpoint
    from permsparse.checkpoint.record import read_record

    expected = output(model)
    masked = export_checkpoint(model, None, tmp_path / "masked", config, report)
    torch.testing.assert_close(output(reload(masked)), expected, atol=0, rtol=0)
    folded = export_checkpoint(model, None, tmp_path / "folded", config, report, export=ExportConfig("folded"))
    torch.testing.assert_close(output(reload(folded)), expected, atol=1e-5, rtol=1e-4)
    for folder in (masked, folded):
        assert check_checkpoint(folder).ok, folder
    return read_record(folded).fold


def prune_interrupted_after_first_block(monkeypatch, model, config, windows, state_dir) -> None:
    """Run ``prune`` until its second block is pruned, then stop it as Ctrl-C would (its progress stays in
    ``state_dir``), as an interrupted process leaves it."""
    import permsparse.pipeline as pipeline
    from permsparse import prune

    original, calls = pipeline.apply_plan, {"n": 0}

    def crash_on_second_block(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(pipeline, "apply_plan", crash_on_second_block)
    with pytest.raises(KeyboardInterrupt):
        prune(model, None, config, windows=windows, state_dir=state_dir, progress=False)
    monkeypatch.setattr(pipeline, "apply_plan", original)
