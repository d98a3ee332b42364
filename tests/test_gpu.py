"""Pruning on a CUDA GPU gives what pruning on the CPU gives, and its checkpoint reloads on the CPU.

Every test needs a CUDA GPU and is skipped without one (``bench/gpu_check.py`` runs them on one). Both
sides compute in float32 from the same dense model and windows: searches must choose the CPU's
permutations and masks; a learned permutation the CPU's hardened permutations, or one judged within
``LEARNED_TOLERANCE`` of the CPU's on the held-out windows (a float32 sum in another order may move a
Sinkhorn step across a tie); weight-updating hosts the CPU's masks and weights to float32 rounding.
"""
import copy

import pytest
import torch

from permsparse import Learned, PruneConfig, Search, check_checkpoint, export_checkpoint, prune
from permsparse.discover.adapters import adapter_for, linear_weight
from permsparse.checkpoint.save import ExportConfig
from permsparse.sparsity.masks import is_nm
from permsparse.run.placement import Placement, is_offloaded
from permsparse.run.resume import Progress

from .conftest import CALIB, HOLDOUT, INPUT, reload, tiny_family

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LEARNED_TOLERANCE = 1e-3  # relative gap of the held-out judgment where the hardened permutations differ
PERMUTATIONS = {
    "none": Search("none"), "cp": Search("cp"), "ria": Search("ria"), "output": Search("output"),
    "learned e2e": Learned(init="ria", steps=4, judge_every=2, tile=16),
    "learned blockwise": Learned(init="ria", scope="blockwise", steps=3, tile=16),
}


def pruned(family: str, config: PruneConfig, device: str, **placement):
    model = tiny_family(family)
    report = prune(model, None, config, windows=CALIB, holdout=HOLDOUT, progress=False,
                   placement=Placement(device, **placement))
    return model, report


def linears(model) -> dict[str, torch.Tensor]:
    adapter = adapter_for(model)
    return {name: linear_weight(module).detach().float().cpu() for name, module in model.named_modules()
            if name.startswith(adapter.blocks_path + ".") and hasattr(module, "weight") and module.weight.dim() == 2}


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("method", list(PERMUTATIONS))
def test_each_permutation_on_the_gpu_gives_the_cpus_masks_and_permutations(family, method):
    config = PruneConfig(permutation=PERMUTATIONS[method])
    cpu_model, cpu = pruned(family, config, "cpu")
    gpu_model, gpu = pruned(family, config, "cuda")
    assert next(gpu_model.parameters()).is_cuda and gpu.peak_device_mb > 0
    masks = [(a != 0, b != 0) for a, b in zip(linears(cpu_model).values(), linears(gpu_model).values())]
    perms = [(a.perm, b.perm) for a, b in zip(cpu.sites, gpu.sites)]
    if method.startswith("learned") and any(a != b for a, b in perms):
        for a, b in zip(cpu.training, gpu.training):  # another hardened set: as good, judged on the held-out windows
            assert abs(a.best_judged - b.best_judged) <= LEARNED_TOLERANCE * abs(a.best_judged)
        return
    assert all(a == b for a, b in perms)
    assert all(torch.equal(a, b) for a, b in masks)


@pytest.mark.parametrize("host", ["wanda", "sparsegpt", "admm"])
def test_each_host_on_the_gpu_gives_the_cpus_masks_and_weights(host):
    config = PruneConfig(score=host, permutation=Search("ria"))
    (cpu_model, _), (gpu_model, _) = (pruned("llama", config, device) for device in ("cpu", "cuda"))
    for (name, a), b in zip(linears(cpu_model).items(), linears(gpu_model).values()):
        assert torch.equal(a != 0, b != 0), name
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * float(a.abs().max()))


@pytest.mark.parametrize("method", ["ria", "learned blockwise"])
def test_an_offloaded_model_gives_what_the_whole_model_on_the_gpu_gives(method):
    """Blocks kept on the host and brought to the GPU one at a time: the same computation, so the same model."""
    config = PruneConfig(permutation=PERMUTATIONS[method])
    whole, _ = pruned("llama", config, "cuda", offload="off")
    offloaded, report = pruned("llama", config, "cuda", offload="on")
    assert is_offloaded(offloaded)
    assert all(p.device.type == "cpu" for p in offloaded.model.layers.parameters())
    assert offloaded.model.embed_tokens.weight.is_cuda
    for (name, a), b in zip(linears(whole).items(), linears(offloaded).values()):
        assert torch.equal(a, b), name
    with torch.no_grad():  # a whole-model pass of the offloaded model: each block visits the GPU
        torch.testing.assert_close(offloaded(INPUT.cuda()).logits, whole(INPUT.cuda()).logits, rtol=0, atol=0)
    assert all(p.device.type == "cpu" for p in offloaded.model.layers.parameters())


def test_bfloat16_learning_on_the_gpu_keeps_a_valid_pattern_and_float32_costs():
    model = tiny_family("llama").to(torch.bfloat16)
    config = PruneConfig(permutation=Learned(init="ria", steps=4, judge_every=2, tile=16))
    report = prune(model, None, config, windows=CALIB, holdout=HOLDOUT, progress=False, placement=Placement("cuda"))
    assert {"statistics", "search", "learning", "pruning"} <= set(report.stages)
    for name, module in model.named_modules():
        if name.startswith("model.layers.") and isinstance(module, torch.nn.Linear):
            perm = report.permutation_of(name)
            assert module.weight.dtype == torch.bfloat16
            assert is_nm(module.weight.detach()[:, perm].float().cpu(), 2, 4), name


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_a_checkpoint_pruned_on_the_gpu_reloads_on_the_cpu_to_the_same_logits(family, tmp_path):
    config = PruneConfig(permutation=Search("ria"), binding="global")
    model, report = pruned(family, config, "cuda")
    with torch.no_grad():
        expected = model(INPUT.cuda()).logits.float().cpu()
    for export in (ExportConfig(), ExportConfig("folded")):
        out = export_checkpoint(copy.deepcopy(model), None, tmp_path / export.format, config, report, export=export)
        assert check_checkpoint(out, device="cpu").ok
        with torch.no_grad():
            got = reload(out)(INPUT).logits
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


def test_progress_saved_from_the_gpu_resumes_to_the_same_model(tmp_path, monkeypatch):
    config = PruneConfig(permutation=Learned(init="ria", steps=12, judge_every=2, tile=16))
    reference, _ = pruned("llama", config, "cuda")
    original = Progress.save

    def save_then_die(self, key, value, **kwargs):
        original(self, key, value, **kwargs)
        if key == "training":
            raise KeyboardInterrupt

    monkeypatch.setattr(Progress, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        prune(tiny_family("llama"), None, config, windows=CALIB, holdout=HOLDOUT, state_dir=tmp_path, progress=False,
              placement=Placement("cuda"))
    monkeypatch.setattr(Progress, "save", original)
    resumed = tiny_family("llama")
    prune(resumed, None, config, windows=CALIB, holdout=HOLDOUT, state_dir=tmp_path, progress=False,
          placement=Placement("cuda"))
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("quant", ["none", "int4", "int8"])
def test_a_compressed_checkpoint_loads_on_the_gpu_into_24_modules_without_densifying(quant, tmp_path):
    from permsparse import Quantization, load
    from permsparse.checkpoint.load import stored_linears
    from permsparse.deploy.int4 import Int4Linear24
    from permsparse.deploy.linear import Linear24

    config = PruneConfig(permutation=Search("ria"), binding="per-linear",
                         quant=Quantization(quant, 16, method="rtn") if quant != "none" else Quantization("none"))
    model, report = pruned("llama", config, "cpu")
    folder = export_checkpoint(model, None, tmp_path / "c", config, report,
                               export=ExportConfig("compressed", save_dtype="bfloat16"))
    reference = load(folder)  # the CPU's stored form, expanded per forward
    deployed = load(folder, device="cuda")
    done = deployed.permsparse_deploy["semi_structured"]
    assert sorted(done["converted"]) == sorted(layer.name for layer in report.layers), done["not_converted"]
    assert not stored_linears(deployed)
    kinds = {type(deployed.get_submodule(layer.name)) for layer in report.layers}
    assert kinds == ({Int4Linear24} if quant == "int4" else {Linear24})
    for tokens in (INPUT[:, :4], INPUT):  # the decode kernels, then prefill (cuSPARSELt)
        with torch.no_grad():
            expected = reference(tokens).logits.float()
            got = deployed(tokens.cuda()).logits.float().cpu()
        assert ((got - expected).abs().max() / expected.abs().max()).item() < 5e-2
