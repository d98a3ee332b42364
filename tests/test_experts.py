"""Mixture-of-experts layers whose experts are packed 3-D tensors (transformers 5): split into one linear
per expert projection, pruned on the tokens routed to each expert, exported packed, checked."""
import json

import pytest
import torch

from permsparse import Learned, PruneConfig, Search, check_checkpoint, prune
from permsparse.discover.adapters import adapter_for
from permsparse.sparsity.statistics import capture_block_inputs, collect_input_stats
from permsparse.discover import ExpertLinears, NotUnderstood, discover, experts_as_linears
from permsparse.sparsity.masks import nm_mask, nm_violation

from .conftest import CALIB, HOLDOUT, INPUT, export_both_ways, tiny_family
from .test_families import CONFIGS, output

MOE = {
    "qwen3_moe": {"num_key_value_heads": 2, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                  "moe_intermediate_size": 32},
    "mixtral": {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64},
    "qwen2_moe": {"num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                  "shared_expert_intermediate_size": 64},
    "olmoe": {"num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64},
    # transposed (E, in, out) tensors, gate and up interleaved, biases, its own clamped gating
    "gpt_oss": {"num_key_value_heads": 2, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
                "intermediate_size": 32, "layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8},
    # a router kept inside a gate module (mlp.gate.wg)
    "hunyuan_v1_moe": {"num_key_value_heads": 2, "head_dim": 16, "num_experts": 4},
    # a router that is an nn.Linear returning its logits and top-k choices
    "phimoe": {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 64},
}
ROUTERS = {"qwen2_moe": ("mlp.gate", "mlp.shared_expert_gate"), "gpt_oss": ("mlp.router",),
           "hunyuan_v1_moe": ("mlp.gate.wg",), "phimoe": ("mlp.router",)}
EXPERT = "mlp.experts.{}.{}"
METHODS = {**CONFIGS, "sparsegpt": PruneConfig(score="sparsegpt", permutation=Search("ria"), binding="shared")}


def tiny_moe(family, seed=0):
    return tiny_family(family, seed=seed, **MOE[family])


@pytest.mark.parametrize("family", sorted(MOE))
def test_split_experts_compute_the_packed_output_and_write_into_it(family):
    model = tiny_moe(family)
    packed = type(model.model.layers[0].mlp.experts)
    keys = list(model.state_dict())
    expected = output(model)
    with experts_as_linears(model) as names:
        assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
        split = model.model.layers[0].mlp.experts
        assert isinstance(split, ExpertLinears) and len(split) == 4
        torch.testing.assert_close(output(model), expected, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            split[2].down_proj.weight.zero_()
            split[1].up_proj.weight[3, 5] = 7.0
    experts = model.model.layers[0].mlp.experts
    assert type(experts) is packed and list(model.state_dict()) == keys
    assert experts.down_proj[2].abs().sum() == 0
    if family == "gpt_oss":  # (E, in, out), gate and up interleaved
        assert experts.gate_up_proj[1, 5, 2 * 3 + 1] == 7.0
    else:  # (E, out, in), the up rows after the gate rows
        assert experts.gate_up_proj[1, experts.gate_up_proj.shape[1] // 2 + 3, 5] == 7.0


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss", "hunyuan_v1_moe", "phimoe"])
def test_discovery_finds_every_expert_its_fold_and_the_dense_routers(family):
    model = tiny_moe(family)
    with pytest.raises(NotUnderstood, match=r"packed expert parameters model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        adapter_for(model)  # packed, the experts hold no linear
    with experts_as_linears(model):
        adapter = discover(model)
    groups = [(EXPERT.format(e, "gate_proj"), EXPERT.format(e, "up_proj")) for e in range(4)]
    assert set(groups) <= set(adapter.input_groups)
    folds = {c: [s.describe() for s in slices] for c, slices in adapter.producers}
    for e, (gate, up) in enumerate(groups):
        assert folds[EXPERT.format(e, "down_proj")] == [gate, up]
        assert {gate, up} <= set(adapter.residual_readers)
        assert EXPERT.format(e, "down_proj") in adapter.residual_writers
    expected = ROUTERS.get(family, ("mlp.gate",))
    assert adapter.routers == expected and not adapter.not_foldable and adapter.stream_problem == ""
    assert not set(expected) & {name for group in adapter.input_groups for name in group}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "qwen2_moe", "gpt_oss", "hunyuan_v1_moe", "phimoe"])
def test_every_method_prunes_the_experts_exports_and_checks(family, method, tmp_path):
    model, config = tiny_moe(family), METHODS[method]
    routers = {name: p.clone() for name, p in model.named_parameters() if any(f".{r}." in name for r in
                                                                              ("gate", "shared_expert_gate", "router"))
               and "experts" not in name}
    report = prune(model, None, config, windows=CALIB[:4], holdout=HOLDOUT[:2], progress=False)
    assert all(torch.equal(p, routers[name]) for name, p in model.named_parameters() if name in routers)
    assert set(report.dense) == {name.rpartition(".")[0] for name in routers} and routers
    perms = {name: torch.as_tensor(site.perm) for site in report.sites for name in site.linears}
    with experts_as_linears(model):
        for e in range(4):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                name = f"model.layers.1.{EXPERT.format(e, proj)}"
                weight = model.get_submodule(name).weight
                assert nm_violation(weight[:, perms[name]], 2, 4) == ""
    fold = export_both_ways(model, config, report, tmp_path, output)
    if config.binding == "global":
        assert fold.storage_nm_share == 1.0 and not fold.not_folded


def test_expert_statistics_come_from_the_tokens_routed_to_it():
    model = tiny_moe("qwen3_moe")
    with experts_as_linears(model):
        adapter = adapter_for(model)
        inputs, kwargs = capture_block_inputs(model, adapter, CALIB[:4])
        block = model.model.layers[0]
        seen = {"chosen": [], "x": []}

        def routed(_module, _args, out):
            seen["chosen"].append(out[2])

        def hidden(_module, args):
            seen["x"].append(args[0].reshape(-1, args[0].shape[-1]))

        handles = [block.mlp.gate.register_forward_hook(routed), block.mlp.register_forward_pre_hook(hidden)]
        readers = {EXPERT.format(e, "gate_proj"): EXPERT.format(e, "gate_proj") for e in range(4)}
        stats, _ = collect_input_stats(block, readers, inputs, kwargs, True, "model.layers.0", batch_size=4)
        for handle in handles:
            handle.remove()
    x, chosen = torch.cat(seen["x"]).double(), torch.cat(seen["chosen"])
    for e in range(4):
        routed = x[(chosen == e).any(-1)]
        s = stats[EXPERT.format(e, "gate_proj")]
        assert 0 < s.tokens == len(routed) < len(x)
        torch.testing.assert_close(s.sq_sum, routed.square().sum(0))
        torch.testing.assert_close(s.gram.double(), routed.T @ routed, rtol=1e-5, atol=1e-4)


def test_an_expert_no_token_reaches_is_pruned_by_magnitude_and_reported():
    model = tiny_family("qwen3_moe", **{**MOE["qwen3_moe"], "num_experts_per_tok": 1})
    with torch.no_grad():
        for layer in model.model.layers:  # experts 0 and 1 have opposite logits: one of them beats the 0 of 2 and 3
            router = layer.mlp.gate.weight
            router[1], router[2:] = -router[0], 0.0
    dense = model.model.layers[1].mlp.experts.down_proj[3].clone()
    report = prune(model, None, PruneConfig(score="wanda"), windows=CALIB[:4], progress=False)
    names = {f"model.layers.{i}.{EXPERT.format(e, p)}" for i in range(2) for e in (2, 3)
             for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(report.uncalibrated) == names
    pruned = model.model.layers[1].mlp.experts.down_proj[3]
    assert torch.equal(pruned, dense * nm_mask(dense.abs(), 2, 4))


def test_experts_that_cannot_be_split_name_what_is_not_understood():
    model = tiny_moe("qwen3_moe")
    model.model.layers[0].mlp.experts.has_post_expert_norm = True
    with pytest.raises(NotUnderstood, match=r"experts of model\.layers\.0\.mlp\.experts \(Qwen3MoeExperts\): "
                                            r"a norm after each expert is not supported"):
        prune(model, None, PruneConfig(), windows=CALIB[:2], progress=False)
    assert type(model.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"  # nothing left half-split


def test_split_experts_see_the_same_routing_as_the_packed_model():
    """The logits of a pruned MoE model, packed again, equal those computed on its split form."""
    model = tiny_moe("mixtral")
    prune(model, None, PruneConfig(), windows=CALIB[:4], progress=False)
    packed = output(model, INPUT)
    with experts_as_linears(model):
        torch.testing.assert_close(output(model, INPUT), packed, atol=1e-5, rtol=1e-5)


def test_two_processes_prune_experts_as_one_does(tiny_tokenizer, tmp_path):
    """Every process sums statistics for every expert (also one its own windows route no token to), so
    two processes give the checkpoint of one (the command line under torchrun, gloo)."""
    from .test_distributed import command, run, same_checkpoint

    folder = tmp_path / "tiny-moe"
    tiny_family("qwen3_moe", **{**MOE["qwen3_moe"], "num_experts": 8, "num_experts_per_tok": 1}).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    extra = ("--perm", "learned", "--init", "ria", "--steps", "2", "--judge-every", "1", "--tile", "16", "--batch", "4")
    run(command(folder, tmp_path / "one", *extra))
    run(command(folder, tmp_path / "two", *extra, processes=2))
    same_checkpoint(tmp_path / "one", tmp_path / "two")
    record = json.loads((tmp_path / "one" / "permsparse.json").read_text())
    assert record["report"]["dense"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    assert check_checkpoint(tmp_path / "two").ok


def test_a_reconstruction_after_learning_reports_each_unreached_expert_once():
    """The weight update after an end-to-end learned permutation plans every block a second time, on the
    pruned model's inputs; an expert no token reaches in either pass is listed once."""
    model = tiny_family("qwen3_moe", **{**MOE["qwen3_moe"], "num_experts_per_tok": 1})
    with torch.no_grad():
        for layer in model.model.layers:
            router = layer.mlp.gate.weight
            router[1], router[2:] = -router[0], 0.0
    config = PruneConfig(score="sparsegpt", permutation=Learned(init="ria", steps=1, judge_every=1, tile=16))
    report = prune(model, None, config, windows=CALIB[:4], holdout=HOLDOUT[:2], progress=False)
    names = {f"model.layers.{i}.{EXPERT.format(e, p)}" for i in range(2) for e in (2, 3)
             for p in ("gate_proj", "up_proj", "down_proj")}
    assert sorted(report.uncalibrated) == sorted(names)
