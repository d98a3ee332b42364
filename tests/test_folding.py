"""Folding input permutations into the model: exact (dense logits unchanged) and N:M in storage order."""
import pytest
import torch

from permsparse import PruneConfig, Search, prune
from permsparse.discover.adapters import adapter_for, linear_weight
from permsparse.checkpoint.fold import fold_permutations, global_hidden_permutation, head_permutation
from permsparse.discover.verify import random_head_perm
from permsparse.sparsity.masks import is_nm, permuted_nm_mask

from .conftest import BUILDERS, CALIB, INPUT, tiny_llama, tiny_opt

ATOL = 1e-5


def logits(model):
    with torch.no_grad():
        return model(INPUT).logits


def linears(model):
    """(full name, block-relative name) of every linear of the adapter's input groups."""
    adapter = adapter_for(model)
    for i in range(len(adapter.blocks(model))):
        for group in adapter.input_groups:
            for rel in group:
                yield f"{adapter.blocks_path}.{i}.{rel}", rel


def head_perm(model, generator) -> torch.Tensor:
    """A random attention-output permutation within heads, the same for query heads of one kv head."""
    return random_head_perm(adapter_for(model).attention(model.config), generator)


def random_perms(model, kinds: set[str], hidden: torch.Tensor | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Permutations for the linears of ``kinds``: "attn" (attention output), "mlp" (down), "reader"."""
    adapter, g = adapter_for(model), torch.Generator().manual_seed(seed)
    consumers = {c for c, _ in adapter.producers}
    perms = {}
    for full, rel in linears(model):
        width = linear_weight(model.get_submodule(full)).shape[1]
        if rel == adapter.attn_output and "attn" in kinds:
            perms[full] = head_perm(model, g)
        elif rel in consumers and rel != adapter.attn_output and "mlp" in kinds:
            perms[full] = torch.randperm(width, generator=g)
        elif rel in adapter.residual_readers and "reader" in kinds:
            perms[full] = hidden
    return perms


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("kinds", [{"mlp"}, {"attn"}, {"mlp", "attn"}])
def test_producer_folds_keep_dense_logits(family, kinds):
    model = BUILDERS[family]()
    dense = logits(model)
    perms = random_perms(model, kinds)
    before = state(model)
    report = fold_permutations(model, perms)
    assert report.folded == list(perms) and not report.not_folded
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # the folds did something
    torch.testing.assert_close(logits(model), dense, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(BUILDERS))
@pytest.mark.parametrize("tie", [True, False])
def test_global_hidden_permutation_keeps_dense_logits(family, tie):
    model = BUILDERS[family](tie=tie)
    dense = logits(model)
    hidden = torch.randperm(64, generator=torch.Generator().manual_seed(5))
    touched = global_hidden_permutation(model, hidden)
    assert any("head" in t or "project_out" in t for t in touched)
    torch.testing.assert_close(logits(model), dense, atol=ATOL, rtol=1e-4)


def test_global_hidden_permutation_with_opt_projections():
    """OPT with word_embed_proj_dim != hidden: project_in/out carry the permutation, embeddings stay."""
    model = tiny_opt(proj_dim=32)
    dense, embed = logits(model), model.model.decoder.embed_tokens.weight.clone()
    global_hidden_permutation(model, torch.randperm(64, generator=torch.Generator().manual_seed(3)))
    assert torch.equal(model.model.decoder.embed_tokens.weight, embed)
    torch.testing.assert_close(logits(model), dense, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_everything_folds_with_a_global_permutation(family):
    model = BUILDERS[family]()
    dense = logits(model)
    hidden = torch.randperm(64, generator=torch.Generator().manual_seed(7))
    perms = random_perms(model, {"attn", "mlp", "reader"}, hidden)
    report = fold_permutations(model, perms, hidden_perm=hidden)
    assert report.hidden_perm_applied and sorted(report.folded) == sorted(perms)
    torch.testing.assert_close(logits(model), dense, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_attention_permutation_across_heads_is_refused_and_leaves_the_model(family):
    model = BUILDERS[family]()
    adapter = adapter_for(model)
    name = f"{adapter.blocks_path}.0.{adapter.attn_output}"
    cross = torch.arange(64).roll(8)  # moves channels into the neighbouring head
    before = state(model)
    report = fold_permutations(model, {name: cross})
    assert report.folded == [] and "crosses heads" in report.not_folded[name]
    assert_same_state(before, state(model))


def test_gqa_permutation_must_agree_between_query_heads_of_one_kv_head():
    model = tiny_llama()
    geo = adapter_for(model).attention(model.config)
    inconsistent = torch.cat([torch.randperm(16) + 16 * h for h in range(geo.num_heads)])
    value_rows, reason = head_permutation(inconsistent, geo)
    assert value_rows is None and "kv head" in reason
    before = state(model)
    report = fold_permutations(model, {"model.layers.1.self_attn.o_proj": inconsistent})
    assert "model.layers.1.self_attn.o_proj" in report.not_folded
    assert_same_state(before, state(model))


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_residual_readers_need_the_global_permutation(family):
    model = BUILDERS[family]()
    hidden = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    perms = random_perms(model, {"reader"}, hidden)
    before = state(model)
    report = fold_permutations(model, perms)
    assert not report.folded and all("no global permutation" in r for r in report.not_folded.values())
    assert_same_state(before, state(model))
    other = {name: torch.randperm(64) for name in perms}
    report = fold_permutations(model, other, hidden_perm=hidden)
    assert not report.folded and all("differs" in r for r in report.not_folded.values())


def prune_through(model, perms, n=2, m=4):
    """Masked pruning as the pipeline stores it: mask chosen on |W|[:, p], weight kept in original order."""
    with torch.no_grad():
        for name, perm in perms.items():
            weight = linear_weight(model.get_submodule(name))
            weight.mul_(permuted_nm_mask(weight.abs().float(), perm, n, m))


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_folding_masked_pruned_model_gives_nm_storage_and_same_logits(family):
    model = BUILDERS[family]()
    hidden = torch.randperm(64, generator=torch.Generator().manual_seed(11))
    perms = random_perms(model, {"attn", "mlp", "reader"}, hidden, seed=3)
    prune_through(model, perms)
    masked = logits(model)
    stored = {name: is_nm(linear_weight(model.get_submodule(name)), 2, 4) for name in perms}
    assert not all(stored.values())  # masked storage is N:M only through p
    report = fold_permutations(model, perms, hidden_perm=hidden)
    assert sorted(report.folded) == sorted(perms)
    for name in perms:
        assert is_nm(linear_weight(model.get_submodule(name)), 2, 4), name
    torch.testing.assert_close(logits(model), masked, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_pipeline_shared_binding_folds_attention_output_and_mlp(family):
    """prune(binding="shared") then fold: o/down (and their kin) become N:M in storage, logits unchanged."""
    model = BUILDERS[family]()
    report = prune(model, None, PruneConfig(binding="shared", permutation=Search("ria")), windows=CALIB[:4],
                   progress=False)
    perms = {name: torch.tensor(site.perm) for site in report.sites for name in site.linears}
    assert sorted(perms) == sorted(name for name, _ in linears(model))
    masked = logits(model)
    folded = fold_permutations(model, perms)
    adapter = adapter_for(model)
    consumers = {c for c, _ in adapter.producers}
    assert sorted(folded.folded) == sorted(n for n, rel in linears(model) if rel in consumers)
    assert all("residual reader" in r for r in folded.not_folded.values())
    for name in folded.folded:
        assert is_nm(linear_weight(model.get_submodule(name)), 2, 4), name
    torch.testing.assert_close(logits(model), masked, atol=ATOL, rtol=1e-4)
