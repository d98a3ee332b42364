"""Weight-updating hosts (SparseGPT, ADMM) inside the pipeline, with and without permutations."""
import pytest
import torch

from permsparse import Learned, PruneConfig, Search, check_checkpoint, export_checkpoint, prune
from permsparse.checkpoint.record import read_record
from permsparse.sparsity.masks import is_nm

from .conftest import CALIB, HOLDOUT, INPUT, tiny_llama


def logits_error(config: PruneConfig) -> tuple[float, object, object]:
    dense, model = tiny_llama(), tiny_llama()
    report = prune(model, None, config, windows=CALIB, holdout=HOLDOUT, progress=False)
    with torch.no_grad():
        return float((model(INPUT).logits - dense(INPUT).logits).pow(2).mean()), model, report


@pytest.mark.parametrize("permutation", [Search("none"), Search("ria")])
def test_weight_updates_lower_the_error_of_the_same_permutation(permutation):
    wanda, _, _ = logits_error(PruneConfig(permutation=permutation))
    sparsegpt, model, report = logits_error(PruneConfig(score="sparsegpt", permutation=permutation))
    admm, _, _ = logits_error(PruneConfig(score="admm", permutation=permutation))
    assert sparsegpt < wanda and admm < wanda, (wanda, sparsegpt, admm)
    assert report.weights_updated
    dense = tiny_llama()
    for site in report.sites:
        for name in site.linears:
            weight = model.get_submodule(name).weight
            assert is_nm(weight[:, torch.tensor(site.perm)], 2, 4), name
    updated = [name for site in report.sites for name in site.linears
               if not torch.equal(model.get_submodule(name).weight,
                                  dense.get_submodule(name).weight * (model.get_submodule(name).weight != 0))]
    assert updated  # kept weights changed: the weights are not W * mask


def test_the_permutations_mask_can_be_kept_fixed():
    """Block 0 sees the same inputs in both runs, so the same Wanda statistics, permutations and masks."""
    _, wanda_model, _ = logits_error(PruneConfig(permutation=Search("ria")))
    _, model, report = logits_error(PruneConfig(score="sparsegpt", permutation=Search("ria"), update_mask="permutation"))
    names = [name for site in report.sites for name in site.linears if ".layers.0." in name]
    assert len(names) == 7
    for name in names:
        assert torch.equal(model.get_submodule(name).weight != 0, wanda_model.get_submodule(name).weight != 0)


def test_learned_permutation_then_reconstruction_exports_and_checks(tmp_path):
    config = PruneConfig(score="sparsegpt", permutation=Learned(init="ria", steps=3, judge_every=1, tile=16),
                         update_mask="permutation")
    error, model, report = logits_error(config)
    plain, _, _ = logits_error(PruneConfig(permutation=Learned(init="ria", steps=3, judge_every=1, tile=16)))
    assert error < plain and report.weights_updated and report.training
    out = export_checkpoint(model, None, tmp_path / "r", config, report)
    assert check_checkpoint(out).ok and read_record(out).report.weights_updated


@pytest.mark.parametrize("host", ["sparsegpt", "admm"])
def test_each_site_keeps_the_permutation_its_update_reconstructs_best(host):
    """A learned permutation is trained for the frozen-weight mask; with a weight update each site keeps
    it or its warm start, whichever the update leaves with the lower output error on the calibration
    inputs, and the weights are that update's."""
    from permsparse.sparsity.statistics import capture_block_inputs, collect_input_stats
    from permsparse.pipeline import apply_plan, plan_block, start_run
    from permsparse.update import UPDATES

    model = tiny_llama()
    run = start_run(model, PruneConfig(score=host, permutation=Learned(init="ria")), None, False)
    inputs, kwargs = capture_block_inputs(model, run.adapter, CALIB)
    stats, _ = collect_input_stats(run.blocks[0], run.readers(0), inputs, kwargs, True, run.name(0))
    plan = plan_block(run, 0, stats, None)
    starts = dict(plan.perms)  # RIA's; the "learned" ones below: RIA's on half the sites, none's on the rest
    names = sorted(starts)
    plan.perms = {site: starts[site] if k % 2 else torch.arange(len(starts[site])) for k, site in enumerate(names)}
    dense = {name: model.get_submodule(f"{run.name(0)}.{name}").weight.clone() for site in plan.sites
             for name in site.linears}
    expected = {}
    for site in plan.sites:
        results = [[UPDATES[host](dense[name], plan.grams[name], 2, 4, perm=perm) for name in site.linears]
                   for perm in (plan.perms[site.name], starts[site.name])]
        best = min((0, 1), key=lambda k: sum(r.error for r in results[k]))
        expected[site.name] = best, results[best]
    apply_plan(run, plan, starts)
    for site in plan.sites:
        best, results = expected[site.name]
        assert (f"{run.name(0)}.{site.name}" in run.report.kept_start) == (best == 1)
        for name, result in zip(site.linears, results):
            assert torch.equal(model.get_submodule(f"{run.name(0)}.{name}").weight, result.weight), name
    assert run.report.kept_start  # RIA beats no permutation somewhere


def test_reconstruction_after_learning_weighs_the_learned_permutation_against_the_search_on_its_inputs():
    """After an end-to-end learned permutation the update runs block by block on the pruned model's
    inputs; each site's alternative is the start's search on those inputs (as a searched run would
    choose it), not the start found on the dense model's."""
    from permsparse.sparsity.statistics import capture_block_inputs, collect_input_stats
    from permsparse.pipeline import plan_block, reconstruct_block, start_run
    from permsparse.sparsity.statistics import run_block
    from permsparse.update import UPDATES

    model = tiny_llama()
    run = start_run(model, PruneConfig(score="admm", permutation=Learned(init="ria")), None, False)
    dense_inputs, kwargs = capture_block_inputs(model, run.adapter, CALIB)
    dense_inputs = run_block(run.blocks[0], dense_inputs, kwargs, 8)
    generator = torch.Generator().manual_seed(0)  # the pruned model's inputs: other channel scales
    inputs = dense_inputs * torch.rand(dense_inputs.shape[-1], generator=generator).mul(3).add(0.1)
    on_dense = plan_block(run, 1, collect_input_stats(run.blocks[1], run.readers(1), dense_inputs, kwargs, True,
                                                      run.name(1))[0], None)
    stats, _ = collect_input_stats(run.blocks[1], run.readers(1), inputs, kwargs, True, run.name(1))
    searched = plan_block(run, 1, stats, None)
    assert any(not torch.equal(on_dense.perms[s], searched.perms[s]) for s in searched.perms)
    learned = {site: torch.arange(len(perm)) for site, perm in searched.perms.items()}
    dense = {name: model.get_submodule(f"{run.name(1)}.{name}").weight.clone() for site in searched.sites
             for name in site.linears}
    expected = {}
    for site in searched.sites:
        results = [[UPDATES["admm"](dense[name], searched.grams[name], 2, 4, perm=perm) for name in site.linears]
                   for perm in (learned[site.name], searched.perms[site.name])]
        expected[site.name] = min((0, 1), key=lambda k: sum(r.error for r in results[k])), results
    outputs = reconstruct_block(run, 1, learned, inputs, kwargs, None)
    for site in searched.sites:
        best, results = expected[site.name]
        assert (f"{run.name(1)}.{site.name}" in run.report.kept_start) == (best == 1)
        for name, result in zip(site.linears, results[best]):
            assert torch.equal(model.get_submodule(f"{run.name(1)}.{name}").weight, result.weight), name
    assert run.report.kept_start  # the search beats no permutation somewhere
    assert torch.equal(outputs, run_block(run.blocks[1], inputs, kwargs, 8))
