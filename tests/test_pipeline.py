"""The block-by-block pipeline on a tiny random LLaMA with grouped-query attention."""
import pytest
import torch

from permsparse import Calibration, PruneConfig, Search, prune
from permsparse.discover.adapters import adapter_for, linear_weight
from permsparse.sparsity.masks import is_nm

from .conftest import BUILDERS, CALIB, INPUT, prune_interrupted_after_first_block, tiny_llama


def target_weights(model):
    adapter = adapter_for(model)
    for i, block in enumerate(adapter.blocks(model)):
        for group in adapter.input_groups:
            for name in group:
                yield f"model.layers.{i}.{name}", linear_weight(block.get_submodule(name))


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("score", ["magnitude", "wanda", "ria"])
def test_every_target_linear_becomes_nm_and_the_rest_stays_dense(pattern, score):
    model, dense = tiny_llama(), tiny_llama()
    n, m = map(int, pattern.split(":"))
    report = prune(model, None, PruneConfig(pattern=pattern, score=score),
                   windows=CALIB, progress=False)
    names = [name for name, _ in target_weights(model)]
    assert [layer.name for layer in report.layers] == names
    for _, weight in target_weights(model):
        assert is_nm(weight, n, m)
        assert (weight != 0).float().mean().item() == pytest.approx(n / m, abs=0.01)
    torch.testing.assert_close(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
    torch.testing.assert_close(model.model.norm.weight, dense.model.norm.weight)


def test_unstructured_half_keeps_half_of_every_row():
    model = tiny_llama()
    prune(model, None, PruneConfig(pattern="50%"), windows=CALIB, progress=False)
    for _, weight in target_weights(model):
        assert ((weight != 0).sum(1) == weight.shape[1] // 2).all()


def test_wanda_uses_the_calibration_statistics():
    """Wanda on real activations differs from magnitude and loses less of the block outputs."""
    dense = tiny_llama()
    with torch.no_grad():  # make some input channels loud, as LLM outlier features are
        for layer in dense.model.layers:
            layer.input_layernorm.weight[::4] *= 20
            layer.post_attention_layernorm.weight[::4] *= 20
    models = {}
    for score in ("magnitude", "wanda"):
        model = tiny_llama()
        model.load_state_dict(dense.state_dict())
        prune(model, None, PruneConfig(score=score), windows=CALIB, progress=False)
        models[score] = model
    with torch.no_grad():
        reference = dense(INPUT).logits
        error = {s: (m(INPUT).logits - reference).pow(2).mean().item() for s, m in models.items()}
    assert error["wanda"] < 0.5 * error["magnitude"], error


def test_include_exclude_and_determinism():
    config = PruneConfig(exclude=("*mlp.down_proj",))
    a, b = tiny_llama(), tiny_llama()
    prune(a, None, config, windows=CALIB, progress=False)
    prune(b, None, config, windows=CALIB, progress=False)
    for (name, wa), (_, wb) in zip(target_weights(a), target_weights(b)):
        assert torch.equal(wa, wb)
        assert is_nm(wa, 2, 4) != name.endswith("down_proj")


def test_dense_propagation_differs_from_pruned_propagation():
    a, b = tiny_llama(), tiny_llama()
    prune(a, None, PruneConfig(), windows=CALIB, progress=False)
    prune(b, None, PruneConfig(calibration=Calibration(propagate="dense")), windows=CALIB, progress=False)
    wa = dict(target_weights(a))["model.layers.1.mlp.down_proj"]
    wb = dict(target_weights(b))["model.layers.1.mlp.down_proj"]
    assert not torch.equal(wa, wb)  # block 1 saw other inputs, so Wanda chose other weights


def test_nan_weights_name_the_layer():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(FloatingPointError, match=r"model\.layers\.1\.mlp\.up_proj"):
        prune(model, None, PruneConfig(), windows=CALIB, progress=False)


def test_inf_activations_name_the_layer():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"model\.layers\.0\.self_attn"):
        prune(model, None, PruneConfig(), windows=CALIB, progress=False)


def test_indivisible_layers_are_skipped_with_a_warning_or_fail_when_strict():
    model = tiny_llama()  # hidden 64 and ffn 128: every width divisible by 8 but not by 48
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj .*in_features=64"):
        prune(model, None, PruneConfig(pattern="2:48", strict=True),
              windows=CALIB, progress=False)
    with pytest.warns(UserWarning, match="skipping"):
        report = prune(model, None, PruneConfig(pattern="2:48"),
                       windows=CALIB, progress=False)
    assert len(report.skipped) == 14 and report.layers == []


@pytest.mark.parametrize("config", [PruneConfig(),
                                    PruneConfig(permutation=Search("output")),
                                    PruneConfig(score="sparsegpt", permutation=Search("ria"))],
                         ids=["wanda", "output-compensate", "sparsegpt-updates"])
def test_an_interrupted_run_resumes_to_the_same_model(tmp_path, monkeypatch, config):
    reference = tiny_llama()
    prune(reference, None, config, windows=CALIB, progress=False)

    prune_interrupted_after_first_block(monkeypatch, tiny_llama(), config, CALIB, tmp_path)
    resumed = tiny_llama()  # a fresh process: dense weights again, progress on disk
    report = prune(resumed, None, config, windows=CALIB, state_dir=tmp_path, progress=False)
    assert len(report.layers) == 14
    for (_, wa), (_, wb) in zip(target_weights(reference), target_weights(resumed)):
        assert torch.equal(wa, wb)
    with pytest.raises(FileExistsError, match="another configuration"):
        prune(tiny_llama(), None, PruneConfig(score="ria"), windows=CALIB,
              state_dir=tmp_path, progress=False)


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_block_by_block_replay_equals_the_model(family):
    """Captured block-0 inputs run through every block give the model's own last hidden state, with
    eager attention too (GPT-2 passes its causal mask positionally)."""
    from permsparse.sparsity.statistics import capture_block_inputs, run_block

    model = BUILDERS[family]()
    model.config._attn_implementation = "eager"
    adapter = adapter_for(model)
    hidden, kwargs = capture_block_inputs(model, adapter, CALIB, batch_size=3)
    assert hidden.shape[0] == CALIB.shape[0]
    for block in adapter.blocks(model):
        hidden = run_block(block, hidden, kwargs, batch_size=3)
    with torch.no_grad():
        states = model(CALIB, output_hidden_states=True).hidden_states
    # the last entry has the final norm applied; compare with the input of that norm instead
    final_norm = dict(model.named_modules())[adapter.final_norms[0]]
    torch.testing.assert_close(final_norm(hidden), states[-1], atol=1e-5, rtol=1e-5)


def test_drift_is_the_dense_minus_pruned_input_correlation():
    """collect_drift gives (X_dense - X)^T X for a linear's inputs, recorded here by hand."""
    from permsparse.sparsity.statistics import capture_block_inputs, collect_drift, collect_input_stats

    model = tiny_llama()
    adapter = adapter_for(model)
    inputs, kwargs = capture_block_inputs(model, adapter, CALIB[:4])
    reference = inputs + 0.1 * torch.randn(inputs.shape, generator=torch.Generator().manual_seed(0))
    block, name = adapter.blocks(model)[0], "mlp.down_proj"
    stats, _ = collect_input_stats(block, {name: name}, inputs, kwargs, True, "block 0", batch_size=3)
    seen = []
    handle = block.get_submodule(name).register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, 128)))
    with torch.no_grad():
        block(inputs, **kwargs), block(reference, **kwargs)
    handle.remove()
    out = collect_drift(block, {name: name}, inputs, reference, kwargs, stats, batch_size=3)
    x, x_dense = seen[0].double(), seen[1].double()
    assert torch.allclose(stats[name].drift.double(), (x_dense - x).T @ x, rtol=1e-4, atol=1e-3)
    assert out.shape == reference.shape


def test_compensation_changes_the_output_search_only():
    a, b = tiny_llama(), tiny_llama()
    prune(a, None, PruneConfig(permutation=Search("output", compensate=False)), windows=CALIB,
          progress=False)
    prune(b, None, PruneConfig(permutation=Search("output")), windows=CALIB, progress=False)
    assert all(((w != 0).sum(1) == w.shape[1] // 2).all() for _, w in target_weights(b))  # 2:4 after its permutation
    assert any(not torch.equal(wa, wb) for (_, wa), (_, wb) in zip(target_weights(a), target_weights(b)))
    c, d = tiny_llama(), tiny_llama()  # ria has nothing to compensate with: the flag changes nothing
    prune(c, None, PruneConfig(permutation=Search("ria", compensate=False)), windows=CALIB,
          progress=False)
    prune(d, None, PruneConfig(permutation=Search("ria")), windows=CALIB, progress=False)
    assert all(torch.equal(wc, wd) for (_, wc), (_, wd) in zip(target_weights(c), target_weights(d)))
