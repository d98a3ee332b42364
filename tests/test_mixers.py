"""Hybrid mixers (state-space and gated linear-attention layers, short convolutions), every expert layout
transformers ships, router state and per-layer inputs: their linears prune, export folded, check and reload
with plain transformers to the pruned model's logits; what is no linear stays dense and is listed with why."""
import pytest
import torch

from permsparse import ExportConfig, PruneConfig, Search, check_checkpoint, export_checkpoint, prune
from permsparse.checkpoint.record import read_record
from permsparse.discover import experts_as_linears, is_linear, linear_weight, primary_output
from permsparse.discover.adapters import adapter_for

from .conftest import CALIB, HOLDOUT, INPUT, reload, tiny_family

# Tiny single-kind configurations (hidden 64, 2 blocks): every layer a state-space / linear-attention mixer, or
# every MLP a mixture of experts.
MIXERS = {
    "mamba": {"time_step_rank": 8, "state_size": 16},
    "mamba2": {"num_heads": 8, "head_dim": 16, "state_size": 16, "n_groups": 1, "expand": 2},
    "qwen3_next": {"num_key_value_heads": 2, "head_dim": 16, "layer_types": ["linear_attention"] * 2,
                   "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 32, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
                   "linear_key_head_dim": 16, "linear_value_head_dim": 16},
    "qwen3_5_text": {"num_key_value_heads": 2, "head_dim": 16, "layer_types": ["linear_attention"] * 2,
                     "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 16,
                     "linear_value_head_dim": 16},
    "lfm2": {"num_key_value_heads": 2, "layer_types": ["conv"] * 2},
    "falcon_h1": {"num_key_value_heads": 2, "mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16,
                  "mamba_d_state": 16, "mamba_n_groups": 1},
    "granitemoehybrid": {"num_key_value_heads": 2, "layer_types": ["mamba"] * 2, "num_local_experts": 4,
                         "num_experts_per_tok": 2, "mamba_n_heads": 4, "mamba_d_head": 32, "mamba_d_state": 16,
                         "mamba_n_groups": 1, "shared_intermediate_size": 64},
    "nemotron_h": {"layers_block_type": ["mamba"] * 2, "num_key_value_heads": 2, "mamba_num_heads": 4,
                   "mamba_head_dim": 16, "ssm_state_size": 16, "n_groups": 1},
    "kimi_linear": {"num_key_value_heads": 4, "layer_types": ["linear_attention"] * 2, "mlp_layer_types": ["sparse"] * 2,
                    "linear_num_heads": 4, "linear_head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
                    "moe_intermediate_size": 32, "num_shared_experts": 1},
    "jamba": {"num_key_value_heads": 2, "attn_layer_period": 4, "attn_layer_offset": 3, "expert_layer_period": 1,
              "expert_layer_offset": 0, "num_experts": 4, "num_experts_per_tok": 2, "mamba_d_state": 16,
              "mamba_dt_rank": 8},
    "zamba2": {"num_key_value_heads": 2, "layers_block_type": ["mamba"] * 2, "mamba_d_state": 16, "mamba_headdim": 16,
               "n_mamba_heads": 8, "attention_head_dim": 16},
}

# Every MLP a mixture of experts, in the packed layouts beyond gate_up_proj + _apply_gate.
EXPERTS = {
    # 2-D w1/v1/w2 of E * I rows each, inside a routed module
    "dbrx": {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 128,
             "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
             "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0}},
    # one 3-D weight per projection, tokens sorted by expert: the MLP and the attention's query/output experts
    "jetmoe": {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "kv_channels": 16},
    # transposed gate_up_proj without _apply_gate, one block of pre-scaled rows per expert; a shared expert
    "llama4_text": {"num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 1,
                    "interleave_moe_layer_step": 1, "intermediate_size_mlp": 128, "intermediate_size": 32},
    # a router with a score-correction bias in a child module; shared experts
    "ernie4_5_moe": {"num_key_value_heads": 2, "moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 32,
                     "moe_layer_start_index": 0, "moe_layer_interval": 1},
    # experts without a gate projection (up_proj, down_proj); shared experts
    "nemotron_h": {"layers_block_type": ["moe"] * 2, "num_key_value_heads": 2, "n_routed_experts": 4,
                   "num_experts_per_tok": 2, "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32},
}

# Per-layer inputs (a slice of a second embedding for every block, gated into the stream).
PER_LAYER = {
    "gemma4_text": {"num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 16, "vocab_size_per_layer_input": 512,
                    "hidden_size_per_layer_input": 16, "layer_types": ["full_attention"] * 2},
}
GEMMA3N = {"num_key_value_heads": 2, "head_dim": 16, "num_kv_shared_layers": 0, "vocab_size_per_layer_input": 512,
           "hidden_size_per_layer_input": 16, "laurel_rank": 8, "activation_sparsity_pattern": [0.0, 0.0],
           "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16}


def output(model, ids=INPUT):
    with torch.no_grad():
        return primary_output(model(ids, use_cache=False) if hasattr(model.config, "use_cache") else model(ids))


def tiny(family, seed=0, options=None):
    return tiny_family(family, seed=seed, **(options or MIXERS[family]))


def block_linears(model):
    """Every linear inside the blocks (packed experts split), with its (out, in) weight."""
    with experts_as_linears(model):
        adapter = adapter_for(model)
        blocks = adapter.blocks(model)
        return {f"{adapter.blocks_path}.{name}": linear_weight(m).detach().clone()
                for name, m in blocks.named_modules() if is_linear(m)}


def prune_export_reload(family, model, tmp_path, config=PruneConfig(permutation=Search("ria"), binding="global"),
                        windows=CALIB[:4]):
    """Prune, export folded, check, reload with plain transformers: the logits of the pruned model, and every
    pruned linear at least half zero; returns the report and the record."""
    report = prune(model, None, config, windows=windows, holdout=HOLDOUT[:2], progress=False)
    expected = output(model)
    folder = export_checkpoint(model, None, tmp_path / "folded", config, report, export=ExportConfig("folded"))
    assert check_checkpoint(folder).ok
    plain = reload(folder)
    torch.testing.assert_close(output(plain), expected, atol=1e-5, rtol=1e-4)
    pruned = {layer.name for layer in report.layers}
    weights = block_linears(plain)
    dense = set(report.dense) | {name.rpartition(".")[0] for name in report.kept_dense}
    assert pruned == set(weights) - dense - set(report.skipped)
    for name in pruned:
        assert (weights[name] == 0).float().mean() >= 0.5, name
    return report, read_record(folder)


@pytest.mark.parametrize("family", sorted(MIXERS))
def test_hybrid_mixers_prune_export_folded_and_reload(family, tmp_path):
    model = tiny(family)
    kept = {name: p.detach().clone() for name, p in model.named_parameters()}
    report, record = prune_export_reload(family, model, tmp_path)
    assert record.report.kept_dense == report.kept_dense and report.kept_dense
    for name, why in report.kept_dense.items():
        assert torch.equal(dict(model.named_parameters())[name], kept[name]), name
    assert any(why == "convolution over positions" for why in report.kept_dense.values())


@pytest.mark.parametrize("family", sorted(EXPERTS))
def test_every_expert_layout_splits_into_views_that_compute_the_packed_output(family):
    model = tiny(family, options=EXPERTS[family])
    expected = output(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    with experts_as_linears(model) as names:
        assert names
        torch.testing.assert_close(output(model), expected, atol=1e-5, rtol=1e-5)
        linears = [m for name in names for m in model.get_submodule(name).modules() if is_linear(m)]
        with torch.no_grad():
            for linear in linears:
                linear.weight.mul_(2.0)  # written through the views into the packed tensors
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(torch.equal(p, 2 * before[name]) for name, p in model.named_parameters() if name in changed)
    assert sum(before[name].numel() for name in changed) == sum(linear.weight.numel() for linear in linears)


@pytest.mark.parametrize("family", sorted(EXPERTS))
def test_every_expert_layout_prunes_exports_folded_and_reloads(family, tmp_path):
    model = tiny(family, options=EXPERTS[family])
    routers = {name: p.detach().clone() for name, p in model.named_parameters()}
    report, record = prune_export_reload(family, model, tmp_path)
    assert report.dense and record.report.dense == report.dense
    for name, p in model.named_parameters():
        if name.rpartition(".")[0] in report.dense or name in report.kept_dense:
            assert torch.equal(p, routers[name]), name
    if family == "ernie4_5_moe":
        assert report.kept_dense == {f"model.layers.{i}.mlp.gate.moe_statics.e_score_correction_bias":
                                     "router state of mlp.gate (routing only)" for i in range(2)}
    shared = [layer.name for layer in report.layers if "shared" in layer.name]
    assert bool(shared) == (family in ("llama4_text", "ernie4_5_moe", "nemotron_h"))


def test_gemma3n_is_refused_in_one_line_naming_its_four_copies_of_the_stream():
    """Gemma 3n's AltUp keeps four copies of the residual stream, made by three projections of the embeddings:
    refused before any work, naming them (per-layer inputs alone, as Gemma 4 has them, prune)."""
    from permsparse.discover import NotUnderstood

    with pytest.raises(NotUnderstood, match=r"^the first block's input comes from several linears "
                                            r"\(model\.altup_projections\.0, model\.altup_projections\.1, "):
        adapter_for(tiny("gemma3n_text", options=GEMMA3N))


@pytest.mark.parametrize("family", sorted(PER_LAYER))
def test_per_layer_inputs_are_block_arguments_captured_per_window(family, tmp_path):
    """Gemma's per-layer inputs reach every block as an argument made from each window's tokens: captured for
    every window and block, each call takes its windows' slice, so batches of 8 prune as batches of 1 do; the
    export reloads exactly."""
    from dataclasses import replace

    from permsparse.sparsity.statistics import capture_block_inputs

    model, one = tiny(family, options=PER_LAYER[family]), tiny(family, options=PER_LAYER[family])
    _, kwargs = capture_block_inputs(model, adapter_for(model), CALIB, batch_size=3)
    per_layer = [kwargs.for_block(i)["per_layer_input"] for i in range(2)]
    assert kwargs.windowed == {"per_layer_input": 0} and per_layer[0].shape[0] == len(CALIB)
    assert not torch.equal(per_layer[0], per_layer[1])  # each block its own slice
    assert "by model.per_layer_model_projection" in adapter_for(model).stream_problem  # it reads the embeddings
    windows = kwargs.windows(slice(2, 5)).for_block(1)
    assert torch.equal(windows.batch(2, 1)["per_layer_input"], per_layer[1][3:5])
    config = PruneConfig(permutation=Search("ria"), binding="global")
    report, _ = prune_export_reload(family, model, tmp_path, config)
    prune(one, None, replace(config, calibration=replace(config.calibration, batch_size=1)), windows=CALIB[:4],
          holdout=HOLDOUT[:2], progress=False)
    for layer in report.layers:
        torch.testing.assert_close(model.get_submodule(layer.name).weight, one.get_submodule(layer.name).weight)


@pytest.mark.parametrize("score", ["sparsegpt", "admm"])
def test_weight_updates_prune_a_hybrid_model(score, tmp_path):
    """SparseGPT and ADMM update the kept weights of a gated-DeltaNet model's linears on their inputs: in the
    first block (whose inputs the dense model gives), every updated linear is closer to the dense outputs on the
    calibration windows than the dense weights under the same mask, and the export reloads."""
    dense, model = tiny("qwen3_5_text"), tiny("qwen3_5_text")
    inputs, handles = {}, []
    for name, module in dense.model.layers[0].named_modules():
        if is_linear(module):
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: None if name in inputs else
                inputs.update({name: args[0].detach().reshape(-1, args[0].shape[-1])})))
    output(dense, CALIB)
    for handle in handles:
        handle.remove()
    config = PruneConfig(score=score, permutation=Search("ria"), binding="shared")
    report, _ = prune_export_reload("qwen3_5_text", model, tmp_path, config, windows=CALIB)
    assert report.weights_updated
    for name, x in inputs.items():
        w = dense.model.layers[0].get_submodule(name).weight.detach()
        updated = model.model.layers[0].get_submodule(name).weight.detach()
        masked = w * (updated != 0)
        error = ((x @ (w - updated).T).square().sum(), (x @ (w - masked).T).square().sum())
        assert not torch.equal(updated, masked) and error[0] < error[1], name


def test_the_conversion_policy_knows_the_mixers_linears():
    """A pruned state-space model's in/out projections are 2:4 in storage order and the policy converts them
    where 2:4 is cheaper; without a GPU every one stays dense with the reason, nothing fails."""
    import warnings

    from permsparse.deploy import deploy
    from permsparse.deploy.format import format_problem
    from permsparse.deploy.policy import plan

    model = tiny("mamba2")
    report = prune(model, None, PruneConfig(), windows=CALIB[:4], progress=False)
    names = [layer.name for layer in report.layers]
    assert {name.rpartition(".")[2] for name in names} == {"in_proj", "out_proj"}
    shapes = {name: tuple(linear_weight(model.get_submodule(name)).shape) for name in names}
    assert all(format_problem(linear_weight(model.get_submodule(name)).half()) == "" for name in names)
    costs = {(o, i, 2048, "float16", kernel): ms for o, i in shapes.values()
             for kernel, ms in (("dense", 1.0), ("cusparselt", 0.6), ("triton", 0.9))}
    chosen = plan(shapes, "float16", {2048: 1.0}, costs, lambda o, i: {"cusparselt": "", "triton": ""})
    assert chosen.converted == names
    if not torch.cuda.is_available():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            result = deploy(model, names)
        assert not result["converted"] and set(result["not_converted"]) == set(names)


def test_a_record_written_before_kept_dense_reads_with_none(tmp_path):
    import json

    model = tiny("lfm2")
    prune_export_reload("lfm2", model, tmp_path)
    path = tmp_path / "folded" / "permsparse.json"
    data = json.loads(path.read_text())
    assert data["report"]["kept_dense"]
    del data["report"]["kept_dense"]
    path.write_text(json.dumps(data))
    assert read_record(tmp_path / "folded").report.kept_dense == {}


@pytest.mark.parametrize("scope", ["e2e", "blockwise"])
def test_the_learned_permutation_runs_on_a_gated_deltanet_model_and_keeps_its_best(scope, tmp_path):
    """Learned from RIA's start on a Qwen3.5-like model (every layer a gated DeltaNet): the kept permutations are
    the best judged on the held-out windows, never worse than the start, and the export reloads."""
    from permsparse import Learned

    learned = Learned(init="ria", steps=4, judge_every=2, tile=16, scope=scope)
    report, _ = prune_export_reload("qwen3_5_text", tiny("qwen3_5_text"), tmp_path,
                                    PruneConfig(permutation=learned, binding="shared"))
    assert report.training
    for record in report.training:
        assert record.best_judged == min(value for _, value in record.judged) <= record.init_judged
