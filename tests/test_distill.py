"""Distillation of the kept weights after pruning: masks fixed, held-out objective lowered, exact export, resume."""
import pytest
import torch

from permsparse import Distill, Learned, PruneConfig, Search, check_checkpoint, export_checkpoint, prune
from permsparse.checkpoint.record import read_record
from permsparse.data.text import calibration_windows
from permsparse.train.distill import dense_weights, distill, learning_rate
from permsparse.sparsity.masks import is_nm
from permsparse.permute.objective import judge_model

from permsparse.config import Calibration

from .conftest import CALIB, HOLDOUT, INPUT, tiny_family, tiny_llama

STEPS = Distill(steps=12, batch=2, lr=3e-4, judge_every=4)


def pruned(config: PruneConfig):
    model = tiny_llama()
    report = prune(model, None, config, windows=CALIB, holdout=HOLDOUT, progress=False)
    return model, report


def logits_error(model) -> float:
    with torch.no_grad():
        return float((model(INPUT).logits - tiny_llama()(INPUT).logits).pow(2).mean())


@pytest.mark.parametrize("permutation", [Search("none"), Search("ria")])
def test_distillation_keeps_every_mask_and_brings_the_model_closer_to_the_dense_one(permutation):
    plain, _ = pruned(PruneConfig(permutation=permutation))
    model, report = pruned(PruneConfig(permutation=permutation, distill=STEPS))
    record = report.distillation
    assert report.weights_updated and record is not None
    assert record.judged[0][0] == 0 and record.best_step > 0
    assert record.best_judged == min(v for _, v in record.judged) < record.judged[0][1]
    assert logits_error(model) < logits_error(plain)  # on windows neither training nor judging saw
    changed = 0
    for site in report.sites:
        for name in site.linears:
            weight, before = model.get_submodule(name).weight, plain.get_submodule(name).weight
            assert torch.equal(weight != 0, before != 0), name  # the same mask: pruned weights stay zero
            assert is_nm(weight[:, torch.tensor(site.perm)], 2, 4), name
            changed += not torch.equal(weight, before)
    assert changed == len(report.layers)  # every pruned linear's kept weights trained


def test_the_kept_weights_are_the_best_judged_and_export_reloads_exactly(tmp_path):
    config = PruneConfig(permutation=Learned(init="ria", steps=3, judge_every=1, tile=16), distill=STEPS)
    model, report = pruned(config)
    out = export_checkpoint(model, None, tmp_path / "d", config, report)
    assert check_checkpoint(out).ok
    record = read_record(out)
    assert record.report.weights_updated and record.report.distillation == report.distillation
    assert record.config.distill == STEPS
    from transformers import AutoModelForCausalLM
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    again = judge_model(saved, tiny_llama(), HOLDOUT, STEPS, STEPS.batch)
    assert again == pytest.approx(report.distillation.best_judged, rel=1e-5)


def test_an_interrupted_distillation_resumes_to_the_uninterrupted_result():
    whole, _ = pruned(PruneConfig(permutation=Search("ria")))
    names = [n for n, m in whole.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    dense = dense_weights(tiny_llama(), names)
    split, _ = pruned(PruneConfig(permutation=Search("ria")))
    expected = distill(whole, dense, CALIB, HOLDOUT, STEPS, progress=False)

    class Stop(Exception):
        pass

    saved = []

    def stop(state):
        saved.append(state)
        raise Stop

    with pytest.raises(Stop):
        distill(split, dense, CALIB, HOLDOUT, STEPS, progress=False, save_state=stop)
    assert saved[0]["step"] == STEPS.judge_every
    resumed, _ = pruned(PruneConfig(permutation=Search("ria")))  # a fresh process: the pruned model again
    record = distill(resumed, dense, CALIB, HOLDOUT, STEPS, progress=False, state=saved[0])
    assert record.judged == expected.judged and record.loss == expected.loss
    for name in names:
        assert torch.equal(resumed.get_submodule(name).weight, whole.get_submodule(name).weight), name


def test_learning_rate_warms_up_then_decays_to_zero():
    config = Distill(steps=40, lr=1e-3)
    rates = [learning_rate(config, s) for s in range(config.steps + 1)]
    assert rates[0] == pytest.approx(5e-4) and rates[1] == pytest.approx(1e-3) == max(rates)
    assert all(a >= b for a, b in zip(rates[1:], rates[2:])) and rates[-1] == pytest.approx(0.0, abs=1e-12)


def test_distillation_windows_leave_the_training_and_held_out_windows_as_they_were():
    ids = torch.arange(20_000)
    train, held = calibration_windows(ids, 8, 64, seed=0, holdout=4)
    both, held_too = calibration_windows(ids, 8, 64, seed=0, holdout=4, extra=20)
    assert torch.equal(both[:8], train) and torch.equal(held_too, held) and len(both) == 28
    for window in both[8:]:
        assert all(abs(int(window[0]) - int(h[0])) >= 64 for h in held)  # never overlaps a held-out window


def test_bad_distillation_settings_fail_in_one_line():
    with pytest.raises(ValueError, match="held-out windows"):
        PruneConfig(distill=Distill(steps=2), calibration=Calibration(holdout=0))
    with pytest.raises(ValueError, match="objective is empty"):
        Distill(steps=2, kl=0.0)
    with pytest.raises(ValueError, match="no LM head"):
        prune(tiny_family("bert"), None, PruneConfig(distill=Distill(steps=2, ce=0.5)), windows=CALIB, holdout=HOLDOUT,
              progress=False)
