"""Structure discovered from the model: every family prunes with every search, exports and checks.

Tiny random models built from their configs (no download): what discovery finds for each family, that
its guesses are verified (a wrong one degrades to "not foldable"), and that pruning, the masked and
folded exports and the checkpoint check work end to end, encoders included.
"""
import dataclasses

import pytest
import torch

from permsparse import Learned, PruneConfig, Search, prune
from permsparse.discover.adapters import LLAMA, adapter_for
from permsparse.checkpoint.fold import global_hidden_permutation
from permsparse.data.text import bos_id, calibration_windows, draw_calibration, eval_windows
from permsparse.discover import Hints, NotUnderstood, discover, primary_output
from permsparse.evaluate.measures import embedding_similarity, perplexity

from .conftest import CALIB, ENCODERS, FAMILY_OPTIONS, HOLDOUT, INPUT, export_both_ways, tiny_family, tiny_llama

FAMILIES = sorted(FAMILY_OPTIONS)
LLAMA_LIKE = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.o_proj",),
              ("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
LLAMA_FOLDS = {"self_attn.o_proj": ["self_attn.v_proj"], "mlp.down_proj": ["mlp.gate_proj", "mlp.up_proj"]}
# family: blocks, input groups, folds (consumer -> producer slices), whether the whole stream permutes
EXPECTED = {
    **{family: ("model.layers", LLAMA_LIKE, LLAMA_FOLDS, True) for family in ("llama", "mistral", "qwen2", "qwen3",
                                                                              "olmo2")},
    "gpt2": ("transformer.h", (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)),
             {"attn.c_proj": ["attn.c_attn[128:192]"], "mlp.c_proj": ["mlp.c_fc"]}, True),
    "opt": ("model.decoder.layers", (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                                     ("self_attn.out_proj",), ("fc1",), ("fc2",)),
            {"self_attn.out_proj": ["self_attn.v_proj"], "fc2": ["fc1"]}, True),
    "phi3": ("model.layers",
             (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
             {"self_attn.o_proj": ["self_attn.qkv_proj[96:128]"],
              "mlp.down_proj": ["mlp.gate_up_proj[0:128]", "mlp.gate_up_proj[128:256]"]}, True),
    "gpt_neox": ("gpt_neox.layers", (("attention.query_key_value",), ("attention.dense",), ("mlp.dense_h_to_4h",),
                                     ("mlp.dense_4h_to_h",)),
                 {"attention.dense": ["attention.query_key_value[32:48 of every 48]"],
                  "mlp.dense_4h_to_h": ["mlp.dense_h_to_4h"]}, True),
    "falcon": ("transformer.h", (("self_attention.query_key_value", "mlp.dense_h_to_4h"), ("self_attention.dense",),
                                 ("mlp.dense_4h_to_h",)),
               {"self_attention.dense": ["self_attention.query_key_value[80:96]"],
                "mlp.dense_4h_to_h": ["mlp.dense_h_to_4h"]}, True),
    "gemma3_text": ("model.layers", LLAMA_LIKE, LLAMA_FOLDS, True),
    "phi": ("model.layers", (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.fc1"),
                             ("self_attn.dense",), ("mlp.fc2",)),
            {"self_attn.dense": ["self_attn.v_proj"], "mlp.fc2": ["mlp.fc1"]}, True),
    "cohere": ("model.layers", (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj",
                                 "mlp.up_proj"), ("self_attn.o_proj",), ("mlp.down_proj",)), LLAMA_FOLDS, True),
    "starcoder2": ("model.layers", LLAMA_LIKE[:2] + (("mlp.c_fc",), ("mlp.c_proj",)),
                   {"self_attn.o_proj": ["self_attn.v_proj"], "mlp.c_proj": ["mlp.c_fc"]}, True),
    "glm": ("model.layers", LLAMA_LIKE[:2] + (("mlp.gate_up_proj",), ("mlp.down_proj",)),
            {"self_attn.o_proj": ["self_attn.v_proj"],
             "mlp.down_proj": ["mlp.gate_up_proj[0:128]", "mlp.gate_up_proj[128:256]"]}, True),
    "bert": ("encoder.layer", (("attention.self.query", "attention.self.key", "attention.self.value"),
                               ("attention.output.dense",), ("intermediate.dense",), ("output.dense",)),
             {"attention.output.dense": ["attention.self.value"], "output.dense": ["intermediate.dense"]}, False),
}


def output(model, ids=INPUT):
    with torch.no_grad():
        return primary_output(model(ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_discovery_finds_blocks_sites_and_verified_folds(family):
    model = tiny_family(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    adapter = adapter_for(model)
    blocks, groups, folds, stream = EXPECTED[family]
    assert adapter.blocks_path == blocks and adapter.input_groups == groups
    assert {c: [s.describe() for s in slices] for c, slices in adapter.producers} == folds
    assert adapter.attn_output in folds and not adapter.not_foldable
    assert (adapter.stream_problem == "") == stream
    readers = {name for group in groups for name in group} - set(folds)
    assert set(adapter.residual_readers) == readers and set(adapter.residual_writers) == set(folds)
    # discovery leaves the model as it was: weights bit for bit, training mode
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()) and model.training


def test_llama_discovery_is_the_reference_layout():
    adapter = adapter_for(tiny_llama())
    assert dataclasses.replace(adapter, geometry=None) == LLAMA


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gpt_neox", "olmo2"])
def test_tensor_parallel_plan_and_traced_graph_agree(family):
    """Readers and writers come from the config's tensor-parallel plan where there is one; the traced
    graph alone finds the same."""
    model = tiny_family(family)
    assert model.config.base_model_tp_plan
    from_plan = adapter_for(model)
    model.config.base_model_tp_plan = None
    assert discover(model) == from_plan


def test_discovery_is_deterministic_and_depends_only_on_the_architecture():
    a, b = discover(tiny_family("qwen3", seed=1)), discover(tiny_family("qwen3", seed=2))
    assert a == b == discover(tiny_family("qwen3", seed=1))


def test_a_wrong_guess_degrades_to_not_foldable():
    """A wrong kv head count: the attention output fold fails its check, so it is not used."""
    model = tiny_llama()
    adapter = discover(model, Hints(kv_heads=lambda config: 4))
    assert adapter.attn_output == "" and "mlp.down_proj" in dict(adapter.producers)
    assert "no exact fold" in dict(adapter.not_foldable)["self_attn.o_proj"]


def test_a_module_that_is_no_model_fails_clearly():
    with pytest.raises(NotUnderstood, match="not a Hugging Face Transformers model"):
        adapter_for(torch.nn.Linear(4, 4))


CONFIGS = {
    "none": PruneConfig(binding="per-linear"),
    "cp": PruneConfig(permutation=Search("cp"), binding="shared"),
    "ria": PruneConfig(permutation=Search("ria"), binding="global"),
    "output": PruneConfig(permutation=Search("output"), binding="shared"),
    "learned": PruneConfig(permutation=Learned(init="ria", steps=2, judge_every=1, tile=16), binding="shared"),
}


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_search_prunes_exports_and_checks(family, method, tmp_path):
    model, config = tiny_family(family), CONFIGS[method]
    report = prune(model, None, config, windows=CALIB[:4], holdout=HOLDOUT[:2], progress=False)
    adapter = adapter_for(model)
    assert len(report.layers) == 2 * sum(len(g) for g in adapter.input_groups)
    fold = export_both_ways(model, config, report, tmp_path, output)
    consumers = {f"{adapter.blocks_path}.{i}.{c}" for i in range(2) for c, _ in adapter.producers}
    if method != "none":
        assert consumers <= set(fold.folded) | set(fold.identity)
    if config.binding == "global" and family not in ENCODERS:
        assert fold.storage_nm_share == 1.0 and not fold.not_folded
    if config.binding == "global" and family in ENCODERS:
        assert fold.not_folded and all("stream cannot be permuted" in r for r in fold.not_folded.values())


def test_encoder_learns_towards_its_final_hidden_states():
    """No LM head: the e2e objective distils the final hidden states (kl's place: one minus their mean cosine
    to the dense model's, as embedding similarity reports it) and the blocks' outputs; asking for CE fails
    at once; blockwise learning works."""
    from permsparse.permute.objective import dense_states, model_terms, objective

    with pytest.raises(ValueError, match="no LM head, so no cross-entropy"):
        prune(tiny_family("bert"), None, PruneConfig(permutation=Learned(init="ria", steps=2, ce=2.0)),
              windows=CALIB[:4], holdout=HOLDOUT[:2], progress=False)
    dense, model = tiny_family("bert"), tiny_family("bert")
    prune(model, None, PruneConfig(), windows=CALIB[:4], progress=False)
    weights = objective(model, Learned(hidden=0.0))
    assert (weights.ce, weights.kl) == (0.0, 1.0)
    with torch.no_grad():
        loss = model_terms(model, INPUT, weights, dense_states(dense, INPUT, weights)).value(weights)
        cosine = torch.nn.functional.cosine_similarity(model(INPUT).last_hidden_state, dense(INPUT).last_hidden_state,
                                                       dim=-1).mean()
    torch.testing.assert_close(loss, 1 - cosine)
    for scope in ("e2e", "blockwise"):
        learned = Learned(init="ria", steps=2, judge_every=1, tile=16, scope=scope)
        report = prune(tiny_family("bert"), None, PruneConfig(permutation=learned, binding="shared"),
                       windows=CALIB[:4], holdout=HOLDOUT[:2], progress=False)
        assert report.training and all(r.best_judged <= r.init_judged for r in report.training)


def test_encoder_is_evaluated_by_embedding_similarity(tiny_tokenizer):
    dense, model = tiny_family("bert"), tiny_family("bert")
    prune(model, None, PruneConfig(), windows=CALIB[:4], progress=False)
    ids = torch.randint(5, 512, (300,), generator=torch.Generator().manual_seed(0))
    same = embedding_similarity(dense, dense, tiny_tokenizer, seqlen=32, windows=4, ids=ids, progress=False)
    pruned = embedding_similarity(model, dense, tiny_tokenizer, seqlen=32, windows=4, ids=ids, progress=False)
    assert same.cosine == pytest.approx(1.0, abs=1e-5) and same.windows == 4 and same.tokens == 4 * 32
    assert 0 < pruned.cosine < 0.9999
    with pytest.raises(ValueError, match="no LM head"):
        perplexity(model, tiny_tokenizer, seqlen=32, ids=ids, progress=False)
    with pytest.raises(ValueError, match="final hidden state"):
        global_hidden_permutation(model, torch.arange(64))


@pytest.fixture()
def bos_tokenizer(tiny_tokenizer):
    """The tiny tokenizer, adding BOS in front of every text as LLaMA-2's and OPT's do."""
    import copy

    from tokenizers import processors

    tokenizer = copy.deepcopy(tiny_tokenizer)
    bos = tokenizer.bos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    assert tokenizer("a b", add_special_tokens=True)["input_ids"][0] == bos
    return tokenizer


def test_windows_start_with_bos_when_the_tokenizer_adds_one(tiny_tokenizer, bos_tokenizer, tmp_path):
    assert bos_id(tiny_tokenizer) is None  # SmolLM2's convention: no BOS, windows unchanged
    bos = bos_id(bos_tokenizer)
    assert bos == bos_tokenizer.bos_token_id
    ids = torch.arange(1000)
    plain, _ = calibration_windows(ids, 4, 16, seed=0)
    assert torch.equal(plain, calibration_windows(ids, 4, 16, seed=0, bos_id=None)[0])
    with_bos, held = calibration_windows(ids, 4, 16, seed=0, holdout=2, bos_id=bos)
    assert with_bos.shape == (4, 16) and held.shape == (2, 16) and (with_bos[:, 0] == bos).all()
    assert (held[:, 0] == bos).all() and (with_bos[:, 1:] != bos).all()
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    windows, _ = draw_calibration(bos_tokenizer, str(text), 3, 16, 0)
    assert (windows[:, 0] == bos).all()
    windows, _ = draw_calibration(tiny_tokenizer, str(text), 3, 16, 0)
    assert (windows[:, 0] != bos).any()
    assert (eval_windows(ids, 16, 3, bos)[:, 0] == bos).all()


@pytest.mark.parametrize("family", ["bloom", "xglm"])
def test_block_arguments_built_per_window_are_repeated_to_each_batch(family, tmp_path):
    """BLOOM's ALiBi bias has a slice per window (batch x heads rows) and XGLM checks its mask against the
    batch: captured for one window, they are repeated to every batch the blocks run, so batches of 8 give
    the statistics and the pruned model that batches of 1 give, and the export reloads exactly."""
    from permsparse.sparsity.statistics import capture_block_inputs

    model = tiny_family(family, **({"n_head": 4, "n_layer": 2} if family == "bloom" else {"ffn_dim": 128}))
    _, kwargs = capture_block_inputs(model, adapter_for(model), CALIB)
    assert kwargs.per_window  # the bias or the mask is the one that grows with the batch
    config = PruneConfig(permutation=Search("ria"), binding="shared")
    one = tiny_family(family, **({"n_head": 4, "n_layer": 2} if family == "bloom" else {"ffn_dim": 128}))
    report = prune(model, None, config, windows=CALIB, progress=False)
    prune(one, None, dataclasses.replace(config, calibration=dataclasses.replace(config.calibration, batch_size=1)),
          windows=CALIB, progress=False)
    for layer in report.layers:
        torch.testing.assert_close(model.get_submodule(layer.name).weight, one.get_submodule(layer.name).weight)
    export_both_ways(model, config, report, tmp_path, lambda m: primary_output(m(INPUT)))


@pytest.mark.parametrize("family, options, parts", [
    ("doge", {"num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "sliding_window": 64},
     "model.layers.0.self_attn.dt_proj (2)"),
    ("roc_bert", {"is_decoder": True}, "roc_bert.embeddings.pronunciation_embed (768)")])
def test_parts_of_another_width_on_the_stream_are_named_and_the_rest_prunes(family, options, parts, tmp_path):
    """A writer or an embedding on the residual stream whose width is not the stream's: discovery names it
    as why the whole stream cannot be permuted (it used to fail inside the check), and pruning works."""
    model = tiny_family(family, **options)
    problem = adapter_for(model).stream_problem
    assert problem.startswith("parts found on the stream are not 64 wide: ") and parts in problem
    config = PruneConfig(permutation=Search("ria"), binding="shared")
    report = prune(model, None, config, windows=CALIB, progress=False)
    export_both_ways(model, config, report, tmp_path, lambda m: primary_output(m(INPUT)))


def test_weights_of_no_linear_are_kept_dense_with_their_reason():
    """A state-space mixer's convolution and decay are no linear's: they stay dense, listed with why (the
    mixer's linears prune: tests/test_mixers.py)."""
    kept = {part.name: part.reason for part in adapter_for(tiny_family("mamba", time_step_rank=8, state_size=16)).kept_dense}
    state = "state-space / recurrence parameter of MambaMixer, not a linear layer's"
    assert kept == {"mixer.A_log": state, "mixer.D": state,
                    "mixer.conv1d.weight": "convolution over positions", "mixer.conv1d.bias": "convolution over positions",
                    **{f"mixer.dt_proj.{p}": "a linear's weight that mixer uses itself (never called as a module): no "
                                             "statistics of its inputs" for p in ("weight", "bias")}}


def test_a_block_that_fails_on_its_own_is_named_and_a_failure_of_ours_stays_a_traceback():
    """A family's block that fails when run without its model (transformers' code raising) is refused in one
    line naming the block; an error raised inside permsparse is not disguised as one."""
    from permsparse.discover import linear_weight
    from permsparse.sparsity.statistics import run_block

    class NeedsItsModel(torch.nn.Module):
        def forward(self, hidden, layer_idx=None):
            return {3: hidden}[layer_idx]  # a map the model would have filled

    class CallsUs(torch.nn.Module):
        def forward(self, hidden):
            return linear_weight(hidden)  # fails inside permsparse

    x = torch.zeros(4, 3, 8)
    assert torch.equal(run_block(NeedsItsModel(), x, {"layer_idx": 3}, 2), x)
    with pytest.raises(NotUnderstood, match=r"NeedsItsModel fails when run on its own .*KeyError: 0"):
        run_block(NeedsItsModel(), x, {"layer_idx": 0}, 2)
    with pytest.raises(AttributeError):
        run_block(CallsUs(), x, {}, 2)
