"""The learned permutation inside the pipeline (e2e and blockwise) on tiny random models."""
import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from permsparse import Calibration, Learned, PruneConfig, export_checkpoint, prune
from permsparse.discover.adapters import adapter_for, linear_weight
from permsparse.sparsity.statistics import capture_block_inputs, collect_input_stats, run_block
from permsparse.sparsity.masks import is_nm, permuted_nm_mask
from permsparse.permute.objective import hidden_distance, judge_model
from permsparse.sparsity.scores import compute_score

from .conftest import CALIB, HOLDOUT, tiny_gpt2, tiny_llama

BINDINGS = ["per-linear", "shared", "global"]


def config(scope="blockwise", binding="per-linear", propagate="dense", include=(), **learned):
    settings = dict(init="ria", scope=scope, steps=12, judge_every=3, lr=0.2, tile=16, batch=2)
    return PruneConfig(permutation=Learned(**{**settings, **learned}), binding=binding,
                       calibration=Calibration(propagate=propagate), include=include)


def learned(cfg: PruneConfig, model=None):
    model = tiny_llama() if model is None else model
    return model, prune(model, None, cfg, windows=CALIB, holdout=HOLDOUT, progress=False)


def dense_statistics(dense, adapter):
    """Wanda's act norms of every target linear, from the dense model with dense propagation."""
    inputs, kwargs = capture_block_inputs(dense, adapter, CALIB)
    norms = {}
    for i, block in enumerate(adapter.blocks(dense)):
        readers = {g[0]: g[0] for g in adapter.input_groups}
        stats, inputs = collect_input_stats(block, readers, inputs, kwargs, False, f"block {i}")
        for group in adapter.input_groups:
            for name in group:
                norms[f"{adapter.blocks_path}.{i}.{name}"] = stats[group[0]].act_norm
    return norms


@pytest.mark.parametrize("scope", ["e2e", "blockwise"])
@pytest.mark.parametrize("binding", BINDINGS)
def test_every_pruned_weight_is_the_dense_weight_times_the_mask_of_its_permuted_score(scope, binding):
    model, report = learned(config(scope, binding))
    dense = tiny_llama()
    adapter = adapter_for(dense)
    norms = dense_statistics(dense, adapter)
    assert len(report.layers) == 14 and report.training
    for site in report.sites:
        perm = torch.tensor(site.perm)
        assert sorted(site.perm) == list(range(len(site.perm)))
        for name in site.linears:
            weight = linear_weight(dense.get_submodule(name))
            mask = permuted_nm_mask(compute_score("wanda", weight, norms[name]), perm, 2, 4)
            pruned = linear_weight(model.get_submodule(name))
            assert torch.equal(pruned, weight * mask), name
            assert is_nm(pruned[:, perm], 2, 4)
    if binding == "global":  # every reader of the residual stream uses the one hidden permutation
        readers = [s for s in report.sites if s.name.endswith(("q_proj", "gate_proj"))]
        assert readers and all(s.perm == report.hidden_perm for s in readers)


@pytest.mark.parametrize("binding", BINDINGS)
def test_the_exported_model_reproduces_the_recorded_e2e_objective(binding, tmp_path):
    """The objective of the kept permutations, recomputed on the saved checkpoint against the dense
    model, is the one recorded: training judged the model that was saved (all sites pruned)."""
    cfg = config("e2e", binding, steps=6, judge_every=2)
    model, report = learned(cfg)
    out = export_checkpoint(model, None, tmp_path / "e2e", cfg, report)
    saved = AutoModelForCausalLM.from_pretrained(out).eval()
    recomputed = judge_model(saved, tiny_llama(), HOLDOUT, cfg.learned, cfg.learned.windows_per_step)
    (record,) = report.training
    assert recomputed == pytest.approx(record.best_judged, rel=1e-5)
    assert record.best_judged == min(v for _, v in record.judged) <= record.init_judged


@pytest.mark.parametrize("binding", BINDINGS)
def test_the_pruned_blocks_reproduce_the_recorded_blockwise_objective(binding):
    cfg = config("blockwise", binding, steps=6, judge_every=2)
    model, report = learned(cfg)
    dense = tiny_llama()
    adapter = adapter_for(dense)
    inputs, kwargs = capture_block_inputs(dense, adapter, HOLDOUT)
    for record, pruned, block in zip(report.training, adapter.blocks(model), adapter.blocks(dense)):
        target = run_block(block, inputs, kwargs)
        num, den = hidden_distance("mse", run_block(pruned, inputs, kwargs), target)
        assert float(num / den) == pytest.approx(record.best_judged, rel=1e-5), record.scope
        inputs = target


def test_the_shared_attention_output_permutation_stays_within_heads_and_kv_groups():
    _, report = learned(config("blockwise", "shared"))
    for site in [s for s in report.sites if s.name.endswith("o_proj")]:
        local = torch.tensor(site.perm).reshape(4, 16) - 16 * torch.arange(4)[:, None]
        assert ((local >= 0) & (local < 16)).all()  # within each head
        assert torch.equal(local[0], local[1]) and torch.equal(local[2], local[3])  # same for one kv head


def test_learning_refines_its_warm_start_within_tiles():
    """Every channel stays within its tile of 16 positions of the warm start (ria)."""
    from permsparse.permute.search import find_permutation

    _, report = learned(config("blockwise", include=("model.layers.0.mlp.down_proj",)))
    dense = tiny_llama()
    norms = dense_statistics(dense, adapter_for(dense))
    name = "model.layers.0.mlp.down_proj"
    start = find_permutation(compute_score("wanda", dense.get_submodule(name).weight, norms[name]), 2, 4, "ria")
    (site,) = report.sites
    assert torch.equal(torch.argsort(start) // 16, torch.argsort(torch.tensor(site.perm)) // 16)
    assert report.training[0].seconds > 0


@pytest.mark.parametrize("objective", [dict(hidden=0.0), dict(ce=0.0), dict(), dict(ce=0.0, hidden=0.0, kl=1.0)],
                         ids=["ce", "hidden", "ce+hidden", "kl"])
def test_e2e_training_from_random_costs_lowers_its_objective(objective):
    model, report = learned(config("e2e", init="random", steps=20, judge_every=2, lr=0.3, batch=4, **objective))
    (record,) = report.training
    assert record.best_judged < record.init_judged
    assert all(p.requires_grad for p in model.parameters())  # frozen only while training


def test_e2e_learning_runs_on_gpt2_conv1d_linears():
    model, report = learned(config("e2e", steps=4, judge_every=2), tiny_gpt2())
    site = next(s for s in report.sites if s.name == "transformer.h.0.mlp.c_proj")
    assert is_nm(linear_weight(model.get_submodule("transformer.h.0.mlp.c_proj"))[:, torch.tensor(site.perm)], 2, 4)


def test_an_empty_e2e_objective_is_refused():
    with pytest.raises(ValueError, match="objective is empty"):
        Learned(ce=0.0, kl=0.0, hidden=0.0)


def test_an_interrupted_e2e_run_resumes_mid_training_to_the_same_model(tmp_path, monkeypatch):
    """Killed right after the learner saved its state, the same command resumes: no search again,
    training continues from the saved step, and the model equals an uninterrupted run's."""
    import permsparse.pipeline as pipeline
    from permsparse.run.resume import Progress

    cfg = config("e2e", steps=12, judge_every=2)
    reference, _ = learned(cfg)
    original = Progress.save

    def save_then_die(self, key, value):
        original(self, key, value)
        if key == "training":
            raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prune(tiny_llama(), None, cfg, windows=CALIB, holdout=HOLDOUT, state_dir=tmp_path, progress=False)
    monkeypatch.setattr(Progress, "save", original)
    assert Progress(tmp_path, None).load("training")["step"] == 5
    monkeypatch.setattr(pipeline, "search_site", lambda *a, **k: pytest.fail("the resumed run searched again"))
    resumed = tiny_llama()
    prune(resumed, None, cfg, windows=CALIB, holdout=HOLDOUT, state_dir=tmp_path, progress=False)
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(FileExistsError, match="another configuration"):
        prune(tiny_llama(), None, config("e2e", steps=3), windows=CALIB, holdout=HOLDOUT, state_dir=tmp_path,
              progress=False)


def test_a_learned_run_needs_held_out_windows():
    with pytest.raises(ValueError, match="held-out"):
        prune(tiny_llama(), None, config("e2e"), windows=CALIB, progress=False)
    dense = tiny_llama()
    model = copy.deepcopy(dense)
    prune(model, None, PruneConfig(), windows=CALIB, progress=False)  # a search needs none


def test_chunked_logit_terms_equal_the_full_computation(monkeypatch):
    """CE and KL taken in chunks of positions (and through checkpoints, with a gradient) equal the
    full-vocabulary computation; KL of a model against itself is zero."""
    import torch.nn.functional as F

    import permsparse.evaluate.measures as evaluation

    model = tiny_llama()
    ids = CALIB[:2]
    hidden = model.base_model(ids).last_hidden_state
    dense = (hidden + 0.3 * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))).detach()
    head = model.get_output_embeddings()
    logits, dense_logits = head(hidden).float(), head(dense).float()
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1), reduction="sum")
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(dense_logits, -1), log_target=True, reduction="sum")
    monkeypatch.setattr(evaluation, "LOGIT_CHUNK", 2 * 512 * 5)  # chunks of 5 positions
    torch.testing.assert_close(evaluation.next_token_nll(head, hidden, ids), nll, rtol=1e-5, atol=1e-4)
    chunked = evaluation.next_token_kl(head, hidden, dense)
    torch.testing.assert_close(chunked, kl, rtol=1e-5, atol=1e-4)
    (grad,) = torch.autograd.grad(chunked, hidden)
    (expected,) = torch.autograd.grad(kl, hidden)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-6)
    assert float(evaluation.next_token_kl(head, dense, dense).detach()) == pytest.approx(0.0, abs=1e-4)
