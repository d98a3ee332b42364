"""Where a run computes: device and dtype resolution, the offload decision, clear refusals, stage timings.

The GPU side of placement (a model on cuda, offloaded blocks) is in tests/test_gpu.py.
"""
import pytest
import torch

import permsparse.run.memory as memory
from permsparse import Learned, PruneConfig, Search, prune
from permsparse.discover.adapters import adapter_for
from permsparse.cli import main
from permsparse.run.placement import Placement, compute_device, compute_dtype

from .conftest import CALIB, HOLDOUT, tiny_family, tiny_llama

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a CUDA GPU")


@NO_GPU
def test_auto_is_the_cpu_without_a_gpu_and_a_missing_gpu_is_one_clear_error():
    assert compute_device("auto") == torch.device("cpu")
    assert compute_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        compute_device("cuda:1")
    assert Placement("cuda:1").device == "cuda:1"  # a config names a device; resolving it checks it
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        Placement("tpu")
    with pytest.raises(ValueError, match="offload"):
        Placement(offload="sometimes")


def test_the_auto_dtype_is_bfloat16_on_a_gpu_and_float32_on_the_cpu():
    assert compute_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert compute_dtype("auto", torch.device("cpu")) == torch.float32
    assert compute_dtype("float16", torch.device("cpu")) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        compute_dtype("int8", torch.device("cpu"))


@NO_GPU
def test_prune_on_a_missing_gpu_stops_with_one_line_before_loading(tiny_llama_dir, tmp_path, capsys):
    assert main(["prune", "--model", str(tiny_llama_dir), "--device", "cuda", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sees no CUDA GPU" in err[0] and "--device cpu" in err[0]
    assert not (tmp_path / "o").exists()


def test_offload_is_chosen_when_the_model_and_the_run_do_not_fit_the_gpu(monkeypatch):
    model, config = tiny_llama(), PruneConfig(permutation=Search("ria"))
    path = adapter_for(model).blocks_path
    windows, holdout = CALIB, HOLDOUT[:0]
    need = memory.resident_bytes(model) + memory.estimate(model, path, config, windows, holdout).total
    gpu = torch.device("cuda", 0)
    for free, expected in ((need, False), (need - 1, True)):
        monkeypatch.setattr(memory, "available_bytes", lambda device, free=free: free)
        assert memory.needs_offload(model, path, config, windows, holdout, gpu) is expected
    assert not memory.needs_offload(model, path, config, windows, holdout, torch.device("cpu"))


@pytest.mark.parametrize("config, message", [
    (PruneConfig(permutation=Learned(steps=2)), "the e2e learned permutation trains the whole model"),
    (PruneConfig(permutation=Learned(steps=2, scope="blockwise")), "keeps the blocks on the host for a GPU"),
])
def test_what_cannot_offload_is_refused_before_any_work(config, message, monkeypatch):
    import permsparse.pipeline as pipeline

    monkeypatch.setattr(pipeline, "capture_block_inputs", lambda *a, **k: pytest.fail("heavy work started"))
    with pytest.raises(ValueError, match=message):
        prune(tiny_llama(), None, config, windows=CALIB, holdout=HOLDOUT, progress=False,
              placement=Placement("cpu", offload="on"))


def test_a_placed_run_equals_a_run_where_the_model_is_and_records_its_stages():
    config = PruneConfig(permutation=Learned(init="ria", steps=3, judge_every=2, tile=16))
    placed, here = tiny_llama(), tiny_llama()
    report = prune(placed, None, config, windows=CALIB, holdout=HOLDOUT, progress=False, placement=Placement("cpu"))
    prune(here, None, config, windows=CALIB, holdout=HOLDOUT, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(placed.parameters(), here.parameters()))
    assert list(report.stages) == ["calibration", "statistics", "search", "learning", "pruning"]
    assert all(seconds >= 0 for seconds in report.stages.values())
    assert sum(report.stages.values()) <= report.seconds
    assert report.peak_device_mb is None  # no GPU memory on the CPU


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_discovery_of_a_16_bit_model_finds_the_float32_models_structure(family):
    """At bfloat16 rounding a wrong fold guess can pass for exact on a small random model (GPT-2's and OPT's
    attention output did); discovery checks in float32 and leaves the weights as they were."""
    half = tiny_family(family).to(torch.bfloat16)
    before = {name: p.clone() for name, p in half.state_dict().items()}
    assert adapter_for(half) == adapter_for(tiny_family(family))
    after = half.state_dict()
    assert all(after[name].dtype == torch.bfloat16 and torch.equal(after[name], p) for name, p in before.items())
