"""Masks that follow the weights while distillation trains them: dynamic, joint, alternate."""
import pytest
import torch

from permsparse import Distill, Learned, PruneConfig, Search, check_checkpoint, export_checkpoint, prune
from permsparse.train.following_masks import _StraightThrough
from permsparse.sparsity.masks import is_nm, permuted_nm_mask
from permsparse.permute.sinkhorn import perm_matrix, relaxed_weight
from permsparse.run.resume import Progress

from .conftest import CALIB, HOLDOUT, tiny_llama

WINDOWS = torch.randint(0, 512, (40, 32), generator=torch.Generator().manual_seed(5))  # 8 to calibrate, 32 to distil


def distilled(masks: str, steps: int = 8, pattern: str = "2:4", **options):
    model = tiny_llama()
    permutation = Search("ria") if ":" in pattern else Search("none")
    config = PruneConfig(pattern=pattern, permutation=permutation,
                         distill=Distill(steps=steps, batch=2, masks=masks, judge_every=2, lr=3e-4, **options))
    report = prune(model, None, config, windows=WINDOWS[:8], holdout=HOLDOUT, progress=False)
    return model, report, config


def pruned_linears(model) -> dict[str, torch.Tensor]:
    return {name: module.weight.detach() for name, module in model.named_modules()
            if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear)}


@pytest.mark.parametrize("masks", ["dynamic", "joint", "alternate"])
def test_following_masks_leave_valid_nm_weights_through_the_reported_permutations(masks, tmp_path):
    model, report, config = distilled(masks)
    for site in report.sites:
        for name in site.linears:
            assert is_nm(model.get_submodule(name).weight.detach()[:, torch.as_tensor(site.perm)], 2, 4), name
    out = export_checkpoint(model, None, tmp_path / masks, config, report)
    assert check_checkpoint(out).ok


def test_dynamic_masks_change_where_fixed_masks_do_not_and_the_record_counts_the_entries_that_left():
    """Fixed masks keep every entry pruning kept; masks that follow the weights move, and the record reports
    the share of the pruning's kept entries now zero in the model."""
    fixed, fixed_report, _ = distilled("fixed", steps=16)
    dynamic, report, _ = distilled("dynamic", steps=16)
    pruned_only = tiny_llama()
    prune(pruned_only, None, PruneConfig(permutation=Search("ria")), windows=WINDOWS[:8], progress=False)
    start = {name: w != 0 for name, w in pruned_linears(pruned_only).items()}
    assert all(torch.equal(w != 0, start[name]) for name, w in pruned_linears(fixed).items())
    moved = sum(int(((w != 0) != start[name]).sum()) for name, w in pruned_linears(dynamic).items())
    assert moved > 0  # pruned weights grew back into their groups
    out = sum(int((start[name] & (w == 0)).sum()) for name, w in pruned_linears(dynamic).items())
    assert fixed_report.distillation.moved == 0.0
    assert report.distillation.moved == out / sum(int(m.sum()) for m in start.values()) > 0
    assert report.distillation.seconds_per_step == report.distillation.seconds / 16


@pytest.mark.parametrize("host, permutation", [("wanda", Search("ria")), ("admm", Search("ria")),
                                               ("wanda", Learned(steps=4, judge_every=2, tile=16, batch=4))],
                         ids=["wanda-ria", "admm-ria", "wanda-learned"])
def test_the_first_masks_are_the_hosts_own(host, permutation):
    """The pruned entries start at zero, so the masks chosen from the weights before the first step are the
    host's own through the pruning's permutation (a search's or the frozen-weight learned one), a
    weight-updating host's (ADMM) too: the first forward pass runs the pruned model as it was."""
    from permsparse.pipeline import following_masks, prune_run, start_run

    model = tiny_llama()
    config = PruneConfig(score=host, permutation=permutation, distill=Distill(steps=1, masks="joint"))
    run = start_run(model, config, None, False)
    run.config = PruneConfig(score=host, permutation=permutation)  # prune without distilling: the start
    prune_run(run, None, WINDOWS[:8], HOLDOUT, None)
    run.config = config
    weights = {name: w.clone() for name, w in pruned_linears(model).items()}
    following = following_masks(run)
    assert all(torch.equal(following.hard()[name], w) for name, w in weights.items())
    forward = following.forward_weights(0, 1, permutations_train=True)
    for name, w in weights.items():
        torch.testing.assert_close(forward[name].detach(), w)


def test_the_straight_through_gradient_reaches_pruned_weights_and_the_relaxation_keeps_its_own():
    weight = torch.randn(8, 16, requires_grad=True)
    mask = permuted_nm_mask(weight.detach().abs(), torch.arange(16), 2, 4)
    grad = torch.randn(8, 16)
    _StraightThrough.apply(weight, mask).backward(grad)
    assert torch.equal(weight.grad, grad)  # every entry, pruned ones too
    local = torch.randperm(16, generator=torch.Generator().manual_seed(1))[None]
    base = torch.arange(16)
    matrices = perm_matrix(local).requires_grad_(True)
    final = mask[:, local[0]]  # the mask in the order of the permuted columns
    weight.grad = None
    relaxed_weight(weight, final, matrices, base, straight_through=True).backward(grad)
    assert torch.equal(weight.grad, grad) and matrices.grad is not None
    weight.grad, matrices.grad = None, None
    out = relaxed_weight(weight, final, matrices, base)
    torch.testing.assert_close(out, weight * mask)
    out.backward(grad)
    assert weight.grad is None and matrices.grad is not None  # the learned permutation's: weights frozen


def test_alternate_trains_the_permutations_then_the_weights():
    """Phases of judge_every steps, the permutations first: after one phase no weight has moved (every kept
    entry is the weight as pruning left it), while the masks follow the permutations; after two, weights moved."""
    dense = pruned_linears(tiny_llama())
    one, report, _ = distilled("alternate", steps=2)
    two, _, _ = distilled("alternate", steps=4)
    for name, weight in pruned_linears(one).items():
        kept = weight != 0
        assert torch.equal(weight[kept], dense[name][kept]), name
    assert any(not torch.equal(w[w != 0], dense[name][w != 0]) for name, w in pruned_linears(two).items())


def test_joint_distillation_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch):
    expected, report, config = distilled("joint", steps=8)
    original = Progress.save

    def save_then_die(self, key, value, **kwargs):
        original(self, key, value, **kwargs)
        if key == "distill":
            raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prune(tiny_llama(), None, config, windows=WINDOWS[:8], holdout=HOLDOUT, state_dir=tmp_path, progress=False)
    monkeypatch.setattr(Progress, "save", original)
    resumed = tiny_llama()
    again = prune(resumed, None, config, windows=WINDOWS[:8], holdout=HOLDOUT, state_dir=tmp_path, progress=False)
    assert again.distillation.judged == report.distillation.judged
    assert [s.perm for s in again.sites] == [s.perm for s in report.sites]
    for a, b in zip(expected.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_dynamic_unstructured_masks_keep_each_rows_density():
    model, _, _ = distilled("dynamic", pattern="50%")
    for name, weight in pruned_linears(model).items():
        assert int((weight != 0).sum(1).max()) <= weight.shape[1] // 2, name


def test_learning_permutations_in_distillation_needs_an_nm_pattern():
    with pytest.raises(ValueError, match="only N:M patterns"):
        PruneConfig(pattern="50%", distill=Distill(steps=2, masks="joint"))
    with pytest.raises(ValueError, match="learning rates"):
        Distill(steps=2, perm_lr=0.0)

