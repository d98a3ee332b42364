"""The memory estimate stops a run that cannot fit before any heavy work, with the flags to change."""
import pytest
import torch

import permsparse.run.memory as memory
from permsparse import Distill, Learned, PruneConfig, prune
from permsparse.discover.adapters import adapter_for
from permsparse.cli import main

from .conftest import CALIB, HOLDOUT, tiny_llama


def test_the_estimate_grows_with_the_batch_and_window_length_not_with_the_window_count():
    model = tiny_llama()
    adapter = adapter_for(model)

    def total(batch, nsamples, seqlen):
        config = PruneConfig(permutation=Learned(batch=batch))
        return memory.estimate(model, adapter.blocks_path, config, torch.zeros(nsamples, seqlen, dtype=torch.long),
                               torch.zeros(4, seqlen, dtype=torch.long)).parts

    small, more_windows, bigger_batch = total(2, 8, 32), total(2, 64, 32), total(8, 8, 32)
    assert more_windows["training activations"] == small["training activations"]
    assert bigger_batch["training activations"] == 4 * small["training activations"]
    assert total(2, 8, 64)["training activations"] > 2 * small["training activations"]


def test_distillation_adds_five_copies_of_the_linears_and_one_training_step_at_its_batch():
    model = tiny_llama()
    adapter = adapter_for(model)
    windows, holdout = torch.zeros(8, 32, dtype=torch.long), torch.zeros(4, 32, dtype=torch.long)
    plain = memory.estimate(model, adapter.blocks_path, PruneConfig(), windows, holdout)
    parts = [memory.estimate(model, adapter.blocks_path, PruneConfig(distill=Distill(steps=5, batch=b)), windows, holdout).parts
             for b in (1, 4)]
    linears = sum(m.weight.numel() for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear))
    assert parts[0]["distillation weights"] == linears * (5 * 4 + 1)
    graph = [p["distillation activations"] - memory.LOGIT_CHUNK_BYTES for p in parts]  # one chunk of logits either way
    assert graph[1] == 4 * graph[0] > 0
    assert "distillation weights" not in plain.parts


@pytest.mark.parametrize("permutation, distill, flags", [(Learned(steps=2), 0, "--batch"), (None, 0, "--nsamples"),
                                                         (None, 3, "--distill-batch")])
def test_a_run_that_cannot_fit_stops_before_the_statistics_pass(monkeypatch, permutation, distill, flags):
    import permsparse.pipeline as pipeline

    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)
    monkeypatch.setattr(pipeline, "capture_block_inputs", lambda *a, **k: pytest.fail("heavy work started"))
    config = PruneConfig(distill=Distill(steps=distill))
    config = config if permutation is None else PruneConfig(permutation=permutation)
    with pytest.raises(memory.InsufficientMemory, match=flags):
        prune(tiny_llama(), None, config, windows=CALIB, holdout=HOLDOUT, progress=False)


def test_out_of_memory_is_one_line_from_the_command_line(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1024)
    assert main(["prune", "--model", str(tiny_llama_dir), "--calib", str(tmp_path / "text.txt"), "--out",
                 str(tmp_path / "o")]) == 2  # an unknown file: the clear data error comes first
    (tmp_path / "text.txt").write_text("to be or not to be " * 2000)
    assert main(["prune", "--model", str(tiny_llama_dir), "--calib", str(tmp_path / "text.txt"), "--nsamples", "4",
                 "--seqlen", "32", "--out", str(tmp_path / "o")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("permsparse: error")]
    assert len(err) == 2 and "out of memory" in err[-1] and "--nsamples" in err[-1]
    assert not (tmp_path / "o").exists()


def test_recomputing_blocks_keeps_activations_of_one_block():
    model = tiny_llama(layers=8)
    adapter = adapter_for(model)
    windows, holdout = torch.zeros(8, 128, dtype=torch.long), torch.zeros(4, 128, dtype=torch.long)
    plain = memory.estimate(model, adapter.blocks_path, PruneConfig(permutation=Learned()), windows, holdout)
    lean = memory.estimate(model, adapter.blocks_path, PruneConfig(permutation=Learned(recompute=True)), windows, holdout)
    assert lean.parts["training activations"] < plain.parts["training activations"] / 4


def test_recomputing_blocks_gives_the_same_training():
    def learn(recompute: bool):
        config = PruneConfig(permutation=Learned(init="ria", steps=4, judge_every=2, tile=16, recompute=recompute))
        report = prune(tiny_llama(), None, config, windows=CALIB, holdout=HOLDOUT, progress=False)
        return report.training[0].loss, [site.perm for site in report.sites]

    assert learn(True) == learn(False)


def test_a_run_that_does_not_fit_names_the_lightest_change_that_would(monkeypatch):
    model = tiny_llama(layers=8)
    adapter = adapter_for(model)
    windows, holdout = torch.zeros(8, 128, dtype=torch.long), torch.zeros(4, 128, dtype=torch.long)
    config = PruneConfig(permutation=Learned(batch=4))
    need = memory.estimate(model, adapter.blocks_path, config, windows, holdout).total
    lean = memory.estimate(model, adapter.blocks_path, PruneConfig(permutation=Learned(batch=4, recompute=True)),
                           windows, holdout).total
    assert lean < need
    monkeypatch.setattr(memory, "available_bytes", lambda device: lean)
    with pytest.raises(memory.InsufficientMemory, match="--recompute would fit"):
        memory.check_memory(model, adapter.blocks_path, config, windows, holdout)
    monkeypatch.setattr(memory, "available_bytes", lambda device: lean - 1)
    with pytest.raises(memory.InsufficientMemory, match="--recompute --batch 1 would fit"):
        memory.check_memory(model, adapter.blocks_path, config, windows, holdout)
