"""Model structure for the pipeline: discovered from the model, with small family overrides.

The pipeline never asks "is this LLaMA?": it asks the adapter for the blocks, for which linears read
the same input (they share statistics and, with shared binding, one permutation), for the folds and the
residual stream, and for the attention geometry that constrains the output-projection permutation
(docs/method.md, "Binding"). :func:`adapter_for` discovers all of it from the model itself
(:mod:`permsparse.discover`), once per architecture; :data:`HINTS` holds the little a family's config
does not say.
"""
from __future__ import annotations

import hashlib
from contextlib import contextmanager

import torch
from torch import nn

from . import (Adapter, AttentionGeometry, BlockKind, Hints, NotUnderstood, OutputSlice, discover, is_linear,
               linear_weight, stored_layout)

__all__ = [
    "Adapter", "AttentionGeometry", "BlockKind", "HINTS", "Hints", "LLAMA", "NotUnderstood", "OutputSlice", "adapter_for",
    "is_linear", "linear_weight", "replaced_weights", "stored_layout",
]

# What discovery cannot read from a family's config, by model type.
HINTS: dict[str, Hints] = {
    # Falcon's config keeps num_kv_heads even where multi-query attention uses one kv head.
    "falcon": Hints(kv_heads=lambda c: c.num_kv_heads if c.new_decoder_architecture or not c.multi_query else 1),
}

# The LLaMA layout, for tools that build a bare LLaMA block without a model; discovery finds the same
# for every LLaMA-like model (tests/test_families.py).
LLAMA = Adapter(
    name="llama",
    blocks_path="model.layers",
    kinds=(BlockKind(
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
    ),),
    token_embedding="model.embed_tokens",
    final_norms=("model.norm",),
    output_readers=("lm_head",),
)

_DISCOVERED: dict[str, Adapter] = {}


def _architecture(model: nn.Module) -> str:
    """What decides a model's structure: its class, its config and the names and shapes of its parameters."""
    parts = [type(model).__qualname__, model.config.to_json_string()]
    parts += [f"{name}:{tuple(p.shape)}:{p.dtype}" for name, p in model.named_parameters()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def adapter_for(model: nn.Module) -> Adapter:
    """The structure of ``model``, discovered once per architecture; :class:`NotUnderstood` (a ValueError)
    names the part of it that discovery does not understand."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_input_embeddings"):
        raise NotUnderstood(f"{type(model).__name__} is not a Hugging Face Transformers model")
    key = _architecture(model)
    if key not in _DISCOVERED:
        _DISCOVERED[key] = discover(model, HINTS.get(getattr(config, "model_type", ""), Hints()))
    return _DISCOVERED[key]


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
