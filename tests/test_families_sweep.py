"""The family sweep's property on the families users prune in 2026 and on a sample of those that pass today.

Each type is built tiny and random from its config with one layer of each kind (``bench/tiny_types.py``, the
sweep's own builder), pruned by the command line (``permsparse prune --perm ria --export folded`` at 2:4),
checked (``permsparse check``), reloaded with plain transformers, and every matrix inside its blocks counted:
every pruned one must be half zero, and some must be pruned. ``bench/families.py`` runs the same over every
type transformers has.
"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import tiny_types  # noqa: E402

# The families issue 50 names, by model type.
TARGETS = (
    "qwen3_5_text",  # Qwen3.5: gated DeltaNet and full attention layers
    "qwen3_5_moe_text",  # Qwen3.5-MoE
    "qwen3_next",
    "deepseek_v3",  # dense first layer, MLA
    "glm4_moe",  # GLM-4.5: dense first layer
    "qwen3_moe",  # with mlp_only_layers
    "llama4_text",  # Llama 4: its experts' gate
    "minimax",  # lightning (linear) and full attention layers
    "ernie4_5_moe",  # dense first layer, a router bias-correction tensor
    "jamba",
    "falcon_h1",  # attention and Mamba2 in parallel in every layer
    "granitemoehybrid",  # Granite-4 hybrid
    "lfm2",  # short convolutions and attention
    "dbrx",  # 2-D packed experts
    "gemma4_text",  # sliding and full attention of other widths, per-layer inputs
    "nemotron_h",  # Mamba2, attention, MLP and MoE layers
)
# Types that pass today, one of each shape: LLaMA-like, GPT-2's Conv1D, parallel blocks, packed experts, sliding
# attention with q/k norms, ALiBi, and vision-language models (LLaVA with its processor missing from the folder,
# Qwen2-VL whose processor needs torchvision) pruned on text with their tokenizer.
SAMPLE = ("llama", "gpt2", "cohere", "mixtral", "gemma3_text", "bloom", "llava", "qwen2_vl")


@pytest.fixture(scope="module")
def token_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    tiny_types.tokenizer(folder)
    return folder


@pytest.mark.parametrize("model_type", [*TARGETS, *SAMPLE])
def test_family_prunes_exports_folded_checks_and_reloads_half_zero(model_type, token_folder, tmp_path):
    outcome = tiny_types.verdict(model_type, tmp_path, token_folder)
    assert (outcome.status, outcome.message) == ("pass", "")
    assert outcome.pruned > 0 and outcome.half_zero == outcome.pruned


def test_the_tiny_stack_holds_one_layer_of_each_kind():
    """The builder finds the kinds of a stack from its config: dense first layers, per-layer kinds, experts every
    other layer; a stack of one kind keeps two layers."""
    deepseek, _ = tiny_types.tiny_config("deepseek_v3")
    assert (deepseek.num_hidden_layers, deepseek.first_k_dense_replace) == (2, 1)
    qwen, _ = tiny_types.tiny_config("qwen3_next")
    assert set(qwen.layer_types) == {"linear_attention", "full_attention"} and qwen.mlp_only_layers == [0]
    assert qwen.num_hidden_layers == len(qwen.layer_types) <= tiny_types.LONGEST_PREFIX
    jamba, _ = tiny_types.tiny_config("jamba")
    assert jamba.num_hidden_layers == 2 and jamba.attn_layer_period == jamba.expert_layer_period == 2
    nemotron, _ = tiny_types.tiny_config("nemotron_h")
    assert sorted(nemotron.layers_block_type) == sorted(set(nemotron.layers_block_type))  # one of each
    assert {"linear_attention", "full_attention", "moe", "mlp"} <= set(nemotron.layers_block_type)
    llama, kinds = tiny_types.tiny_config("llama")
    assert llama.num_hidden_layers == 2 and llama.hidden_size == 64 and kinds == ""


def test_a_type_that_cannot_be_built_is_named_so():
    with pytest.raises(tiny_types.CannotBuild, match=r"^forward on token ids: .*pixel_values"):
        tiny_types.build("blip")
