"""Model-family knowledge, kept in one place.

The pipeline never asks "is this LLaMA?": it asks the adapter for the blocks, for which linears read
the same input (they share statistics and, with shared binding, one permutation), and for the
attention geometry that constrains the output-projection permutation (docs/method.md, "Binding").
How a linear stores its weight (GPT-2's Conv1D keeps it transposed) is also known only here.
"""
from __future__ import annotations

from contextlib import contextmanager
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
class OutputSlice:
    """Output rows of a linear that feed another linear: chunk ``index`` of ``chunks`` equal chunks.

    ``OutputSlice("attn.c_attn", 2, 3)`` is the value part of GPT-2's fused q/k/v projection. Between
    the producer and its consumer only channel-wise operations may happen (activation, gating product,
    attention's weighted sum over positions), so permuting these rows permutes the consumer's input.
    """

    linear: str
    index: int = 0
    chunks: int = 1


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
    # Folding (docs/method.md, "Binding"). Block-relative names unless said otherwise; empty means "none".
    # ``producers``: consumer linear -> the output slices that make its input (folds are exact and free).
    producers: tuple[tuple[str, tuple[OutputSlice, ...]], ...] = ()
    # Linears reading the residual stream (through a norm) and writing into it (rows add to it).
    residual_readers: tuple[str, ...] = ()
    residual_writers: tuple[str, ...] = ()
    # Norms acting on the residual stream (weight and bias, if any, are indexed by the hidden dim).
    block_norms: tuple[str, ...] = ()
    # Model-level names. Embeddings whose columns are hidden channels; ``token_embedding`` only when no
    # ``input_projection`` exists (OPT's project_in maps a smaller embedding into the stream).
    token_embedding: str = ""
    position_embeddings: tuple[str, ...] = ()
    input_projection: str = ""
    final_norms: tuple[str, ...] = ()
    # Readers of the final hidden state: ``output_projection`` (OPT's project_out) when it exists,
    # otherwise the LM head.
    output_projection: str = ""
    lm_head: str = "lm_head"

    def producers_of(self, consumer: str) -> tuple[OutputSlice, ...]:
        return dict(self.producers).get(consumer, ())

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
    producers=(
        ("self_attn.o_proj", (OutputSlice("self_attn.v_proj"),)),
        ("mlp.down_proj", (OutputSlice("mlp.gate_proj"), OutputSlice("mlp.up_proj"))),
    ),
    residual_readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"),
    residual_writers=("self_attn.o_proj", "mlp.down_proj"),
    block_norms=("input_layernorm", "post_attention_layernorm"),
    token_embedding="model.embed_tokens",
    final_norms=("model.norm",),
)

GPT2 = Adapter(
    name="gpt2",
    model_types=("gpt2",),
    blocks_path="transformer.h",
    input_groups=(("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
    attn_output="attn.c_proj",
    producers=(
        ("attn.c_proj", (OutputSlice("attn.c_attn", 2, 3),)),
        ("mlp.c_proj", (OutputSlice("mlp.c_fc"),)),
    ),
    residual_readers=("attn.c_attn", "mlp.c_fc"),
    residual_writers=("attn.c_proj", "mlp.c_proj"),
    block_norms=("ln_1", "ln_2"),
    token_embedding="transformer.wte",
    position_embeddings=("transformer.wpe",),
    final_norms=("transformer.ln_f",),
)

OPT = Adapter(
    name="opt",
    model_types=("opt",),
    blocks_path="model.decoder.layers",
    input_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.out_proj",),
        ("fc1",),
        ("fc2",),
    ),
    attn_output="self_attn.out_proj",
    needs_bos=True,
    producers=(
        ("self_attn.out_proj", (OutputSlice("self_attn.v_proj"),)),
        ("fc2", (OutputSlice("fc1"),)),
    ),
    residual_readers=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "fc1"),
    residual_writers=("self_attn.out_proj", "fc2"),
    block_norms=("self_attn_layer_norm", "final_layer_norm"),
    token_embedding="model.decoder.embed_tokens",
    position_embeddings=("model.decoder.embed_positions",),
    input_projection="model.decoder.project_in",
    final_norms=("model.decoder.final_layer_norm",),
    output_projection="model.decoder.project_out",
)

ADAPTERS: tuple[Adapter, ...] = (LLAMA, GPT2, OPT)


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
    """The weight as ``(out, in)`` (a view: writing to it writes the module's weight)."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def stored_layout(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """An ``(out, in)`` weight in the layout ``module`` stores it (GPT-2's Conv1D: transposed)."""
    return weight.T if isinstance(module, Conv1D) else weight


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


@contextmanager
def replaced_weights(model: nn.Module, weights: dict[str, torch.Tensor]):
    """Run ``model`` with the named linears' weights replaced by the given ``(out, in)`` tensors.

    The tensors may carry a gradient (they are used as they are, not copied into the parameters), so
    a loss computed and back-propagated inside the block trains whatever they were computed from.
    The original parameters come back on exit.
    """
    saved = []
    try:
        for name, weight in weights.items():
            module = model.get_submodule(name)
            saved.append((module, module._parameters.pop("weight")))
            module.weight = stored_layout(module, weight.to(saved[-1][1].dtype))
        yield model
    finally:
        for module, parameter in reversed(saved):
            del module.weight
            module.register_parameter("weight", parameter)
