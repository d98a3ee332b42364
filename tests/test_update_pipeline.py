"""Weight-updating hosts (SparseGPT, ADMM) inside the pipeline, with and without permutations."""
import pytest
import torch

from permsparse import Learned, PruneConfig, Search, check_checkpoint, export_checkpoint, prune
from permsparse.checkpoint.record import read_record
from permsparse.masks import is_nm

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
