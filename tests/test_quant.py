"""Quantization of the kept weights: RTN and GPTQ exactness, groups in the permuted order, the pipeline."""
import json

import pytest
import torch

from permsparse import Learned, PruneConfig, Quantization, Search, prune
from permsparse.cli import main
from permsparse.config import Distill
from permsparse.sparsity.masks import is_nm, nm_mask, nm_violation
from permsparse.quant import QuantizedWeight, quantized_linears
from permsparse.quant.gptq import gptq
from permsparse.quant.rtn import CLIP_GRID, bfloat16_ceiling, fake_quantize, rtn

from .conftest import CALIB, DATA, HOLDOUT, prune_interrupted_after_first_block, tiny_llama

SHAKESPEARE = str(DATA / "tinyshakespeare" / "input.txt")


def layer_case(out=48, width=256, tokens=1024, seed=0):
    """A pruned 2:4 weight and correlated inputs with uneven channel scales (a fixed random case)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(tokens, 16, generator=g) @ torch.randn(16, width, generator=g)
         + 0.3 * torch.randn(tokens, width, generator=g)) * (0.2 + 3 * torch.rand(width, generator=g))
    weight = torch.randn(out, width, generator=g)
    keep = nm_mask(weight.abs() * x.norm(dim=0), 2, 4)
    return weight * keep, keep, x


def output_error(weight, deployed, x):
    return float((x @ (weight - deployed).T).square().sum())


@pytest.mark.parametrize("kind, group", [("int8", 256), ("int8", 32), ("int4", 32), ("int4", 128)])
def test_rtn_rounds_every_entry_within_half_a_scale(kind, group):
    weight, _, _ = layer_case()
    q = rtn(weight, kind, group)
    step = q.scales.repeat_interleave(group, dim=1)
    error = (q.dequantize() - weight).abs()
    limit = {"int8": 127, "int4": 7}[kind]
    inside = weight.abs() <= limit * step  # int4's clip search may put a group's largest weights beyond its grid
    assert bool((error[inside] <= step[inside] / 2 + 1e-6 * step[inside]).all())
    assert bool((error[~inside] <= weight.abs()[~inside] - limit * step[~inside] + 1e-6).all())
    assert q.codes.dtype == torch.int8 and int(q.codes.min()) >= -limit - (kind == "int4") and int(q.codes.max()) <= limit
    assert bool((q.codes[weight == 0] == 0).all())
    if kind == "int8":  # no clip: the largest magnitude of every group is exactly representable
        assert bool(inside.all())


def test_int4_clip_search_never_rounds_a_group_worse_than_no_clip():
    weight, _, _ = layer_case()
    searched = rtn(weight, "int4", 32).dequantize()
    peak = bfloat16_ceiling(weight.abs().reshape(48, -1, 32).amax(-1) / 7)
    plain = QuantizedWeight("int4", (weight / peak.repeat_interleave(32, 1)).round().clamp(-8, 7).to(torch.int8),
                            peak, 32).dequantize()
    per_group = lambda w: (w - weight).square().reshape(48, -1, 32).sum(-1)  # noqa: E731
    assert bool((per_group(searched) <= per_group(plain) + 1e-6).all())
    assert CLIP_GRID[0] == 1.0 and float(per_group(searched).sum()) < float(per_group(plain).sum())


def test_fp8_codes_are_finite_and_the_largest_weight_maps_to_448():
    weight, _, _ = layer_case()
    q = rtn(weight * 1e-3, "fp8", 256)
    assert q.codes.dtype == torch.float8_e4m3fn and bool(torch.isfinite(q.codes.float()).all())
    assert float(q.codes.float().abs().amax(1).min()) >= 416.0  # the largest weight at e4m3's top (448, or the one
    # below it where the scale was rounded up to bfloat16)
    kept = weight != 0
    relative = ((q.dequantize() - weight * 1e-3).abs() / (weight * 1e-3).abs())[kept & (weight.abs() > 0.05)]
    assert float(relative.max()) <= 2 ** -4  # e4m3: three mantissa bits, round to nearest


def test_groups_follow_the_input_order():
    weight, _, _ = layer_case()
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(4))
    q = rtn(weight, "int8", 16, perm)
    assert torch.equal(q.input_order, perm)
    grouped = bfloat16_ceiling(weight[:, perm].abs().reshape(48, 16, 16).amax(-1) / 127)
    assert torch.equal(q.scales, grouped)  # each scale covers 16 consecutive *permuted* inputs
    assert torch.equal(q.scales.to(torch.bfloat16).float(), q.scales)  # stored as bfloat16 without loss
    assert not torch.equal(rtn(weight, "int8", 16).scales, q.scales)
    assert torch.equal(q.weight()[:, perm], q.dequantize())
    assert torch.equal(q.weight(), rtn(weight[:, perm], "int8", 16).dequantize()[:, torch.argsort(perm)])


@pytest.mark.parametrize("kind, group", [("int8", 256), ("fp8", 256), ("int4", 128), ("int4", 32)])
def test_gptq_keeps_pruned_entries_zero_and_beats_rtn_on_the_output_error(kind, group):
    weight, keep, x = layer_case()
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(5))
    keep_p = torch.empty_like(keep)
    keep_p[:, perm] = nm_mask((weight.abs() * x.norm(dim=0))[:, perm], 2, 4)  # N:M through the permutation
    pruned = weight * keep_p
    for order, mask, w in ((None, keep, weight), (perm, keep_p, pruned)):
        q = gptq(w, mask, x.T @ x, kind, group, order)
        deployed = q.weight()
        assert bool((deployed[~mask] == 0).all()) and bool((q.dequantize()[~mask[:, q.input_order if order is not None
                                                                                   else slice(None)]] == 0).all())
        assert nm_violation(q.codes.float(), 2, 4) == ""  # N:M in storage order
        if kind == "int4":
            assert int(q.codes.min()) >= -8 and int(q.codes.max()) <= 7
        if kind == "fp8":
            assert bool(torch.isfinite(q.codes.float()).all())
        assert output_error(w, deployed, x) < 0.8 * output_error(w, rtn(w, kind, group, order).weight(), x)


def test_fake_quantization_is_the_deployed_weight_with_the_identity_gradient():
    weight, _, _ = layer_case()
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(6))
    w = weight.clone().requires_grad_(True)
    fake = fake_quantize(w, "int4", 32, perm)
    assert torch.equal(fake.detach(), rtn(weight, "int4", 32, perm).weight())
    upstream = torch.randn_like(weight)
    (fake * upstream).sum().backward()
    assert torch.equal(w.grad, upstream)


def test_the_config_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="unknown kind 'int3'"):
        Quantization("int3")
    with pytest.raises(ValueError, match="unknown method"):
        Quantization("int4", method="awq")
    with pytest.raises(ValueError, match="apply only with --quant"):
        Quantization(group=64)
    with pytest.raises(ValueError, match="distill"):
        PruneConfig(quant=Quantization("int8"), distill=Distill(steps=5))
    assert Quantization("int4").group_for(576) == 128 and Quantization("fp8").group_for(576) == 576
    assert PruneConfig(pattern="none").nm is None and PruneConfig(pattern="none").density == 1.0


def quantized_model_is_consistent(model, report, n_m=(2, 4)):
    """Every quantized linear runs exactly its dequantized codes, which are N:M in storage order."""
    records = quantized_linears(model)
    assert records and len(records) == len(report.quantized)
    for name, q in records.items():
        weight = model.get_submodule(name).weight
        assert torch.equal(weight, q.weight(weight.dtype)), name
        if n_m is not None:
            assert nm_violation(q.codes.float(), *n_m) == "", name
            stored = weight if q.input_order is None else weight[:, q.input_order]
            assert is_nm(stored, *n_m), name
    return records


@pytest.mark.parametrize("config", [
    PruneConfig(permutation=Search("ria"), quant=Quantization("int4", 32)),
    PruneConfig(score="sparsegpt", permutation=Search("ria"), quant=Quantization("int8")),
    PruneConfig(score="admm", permutation=Search("cp"), quant=Quantization("fp8", method="rtn")),
    PruneConfig(permutation=Search("output"), binding="shared", quant=Quantization("int4", 16)),
    PruneConfig(permutation=Learned(steps=2, scope="blockwise", judge_every=1, fake_quant=True),
                quant=Quantization("int4", 32)),
], ids=["wanda-ria-int4", "sparsegpt-int8", "admm-cp-fp8-rtn", "output-shared-int4", "learned-blockwise-int4"])
def test_every_host_and_permutation_prunes_then_quantizes(config):
    model = tiny_llama()
    report = prune(model, None, config, windows=CALIB, holdout=HOLDOUT, progress=False)
    records = quantized_model_is_consistent(model, report)
    assert len(records) == 14 and "quantization" in report.stages
    if config.quant.method == "gptq":  # summed over the layers, GPTQ's output error is below round-to-nearest's
        assert sum(r.output_error for r in report.quantized) < sum(r.output_error_rtn for r in report.quantized)
    if config.permuted:
        assert any(q.input_order is not None for q in records.values())


def test_learned_e2e_sees_the_fake_quantized_weights(monkeypatch):
    import permsparse.permute.learned as learned

    seen = []
    original = learned.fake_quantize

    def spy(weight, kind, group, perm):
        seen.append((kind, group))
        return original(weight, kind, group, perm)

    monkeypatch.setattr(learned, "fake_quantize", spy)
    config = PruneConfig(permutation=Learned(steps=2, judge_every=1, fake_quant=True), quant=Quantization("int4", 32))
    model = tiny_llama()
    report = prune(model, None, config, windows=CALIB, holdout=HOLDOUT, progress=False)
    quantized_model_is_consistent(model, report)
    assert seen and set(seen) == {("int4", 32)}
    seen.clear()
    prune(tiny_llama(), None, PruneConfig(permutation=Learned(steps=2, judge_every=1),
                                          quant=Quantization("int4", 32)),
          windows=CALIB, holdout=HOLDOUT, progress=False)
    assert not seen


def test_dense_reference_quantizes_every_linear_without_pruning():
    model = tiny_llama()
    report = prune(model, None, PruneConfig(pattern="none", quant=Quantization("int4", 64, "rtn"), score="magnitude"),
                   progress=False)
    records = quantized_model_is_consistent(model, report, n_m=None)
    assert len(records) == 14 and all(q.input_order is None for q in records.values())
    assert all(int((q.codes != 0).sum()) > 0.8 * q.codes.numel() for q in records.values())  # nothing pruned


def test_a_group_that_does_not_divide_warns_naming_the_linear_or_fails_when_strict():
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj \(in_features=64, --quant-group 128\)"):
        prune(tiny_llama(), None, PruneConfig(quant=Quantization("int4"), strict=True), windows=CALIB, progress=False)
    model = tiny_llama()
    with pytest.warns(UserWarning, match=r"keeping unquantized.*q_proj \(in_features=64"):
        report = prune(model, None, PruneConfig(quant=Quantization("int4")), windows=CALIB, progress=False)
    assert sorted(quantized_linears(model)) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert len(report.unquantized) == 12 and is_nm(model.model.layers[0].self_attn.q_proj.weight, 2, 4)


@pytest.mark.parametrize("config", [
    PruneConfig(permutation=Search("ria"), quant=Quantization("int4", 32)),
    PruneConfig(score="sparsegpt", permutation=Search("ria"), quant=Quantization("fp8")),
], ids=["wanda-int4", "sparsegpt-fp8"])
def test_an_interrupted_quantized_run_resumes_to_the_same_model(tmp_path, monkeypatch, config):
    reference = tiny_llama()
    prune(reference, None, config, windows=CALIB, progress=False)
    prune_interrupted_after_first_block(monkeypatch, tiny_llama(), config, CALIB, tmp_path)
    resumed = tiny_llama()
    report = prune(resumed, None, config, windows=CALIB, state_dir=tmp_path, progress=False)
    quantized_model_is_consistent(resumed, report)
    expected, got = quantized_linears(reference), quantized_linears(resumed)
    assert sorted(expected) == sorted(got) and len(report.quantized) == 14
    for name in expected:
        assert torch.equal(expected[name].codes.float(), got[name].codes.float()), name
        assert torch.equal(expected[name].scales, got[name].scales), name
        assert torch.equal(reference.get_submodule(name).weight, resumed.get_submodule(name).weight), name


def test_the_command_line_prunes_and_quantizes_a_tiny_model(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "q"
    args = ["prune", "--model", str(tiny_llama_dir), "--calib", SHAKESPEARE, "--nsamples", "4", "--seqlen", "64",
            "--eval-windows", "1", "--perm", "ria", "--quant", "int4", "--quant-group", "32", "--out", str(out)]
    assert main(args) == 0
    meta = json.loads((out / "permsparse.json").read_text())
    assert meta["config"]["quant"] == {"kind": "int4", "group": 32, "method": "gptq"}
    assert len(meta["report"]["quantized"]) == 14
    with pytest.raises(SystemExit):
        main(args[:-1] + [str(tmp_path / "bad"), "--quant", "int3"])
    assert "--quant: invalid choice: 'int3'" in capsys.readouterr().err
    assert main(args[:-1] + [str(tmp_path / "bad"), "--quant", "none", "--quant-group", "32"]) == 2
    assert "apply only with --quant" in capsys.readouterr().err
