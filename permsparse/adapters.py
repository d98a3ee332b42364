"""Model-family knowledge, kept in one place.

The pipeline never asks "is this LLaMA?": it asks the adapter for the blocks, for which linears read
the same input (they share statistics and, with shared binding, one permutation), and for the
attention geometry that constrains the output-projection permutation (method.md §4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class AttentionGeometry:
    """Heads of one attention layer; query heads ``h`` read kv head ``h // (num_heads // num_kv_heads)``."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class Adapter:
    """How to walk one model family.

    ``input_groups`` lists, per block, the linears (names relative to the block) that read one and the
    same input tensor, in forward order. ``attn_output`` names the projection that reads the attention
    heads' outputs, so its permutation can be kept within heads and kv groups.
    """

    name: str
    model_types: tuple[str, ...]
    blocks_path: str
    input_groups: tuple[tuple[str, ...], ...]
    attn_output: str
    needs_bos: bool = False

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def attention(self, config) -> AttentionGeometry:
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return AttentionGeometry(heads, kv, head_dim)


LLAMA = Adapter(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3", "smollm3"),
    blocks_path="model.layers",
    input_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    attn_output="self_attn.o_proj",
)

ADAPTERS: tuple[Adapter, ...] = (LLAMA,)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``'s family, or a clear error naming what is supported."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise ValueError(
        f"unsupported architecture {model_type!r}; supported model types: {', '.join(supported_model_types())}"
    )


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``(out, in)``: GPT-2's Conv1D stores it transposed."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))
