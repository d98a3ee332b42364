"""Exact export of permuted sparse models: masked, folded, runtime gathers; the checkpoint check."""
import copy
import json
import warnings
from dataclasses import asdict

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from permsparse.adapters import adapter_for, linear_weight
from permsparse.deploy import load
from permsparse.export import (
    CheckFailed, check_checkpoint, check_command, export_checkpoint, read_metadata, save_checkpoint,
    storage_permutations,
)
from permsparse.masks import is_nm
from permsparse.pruning import PruneConfig, prune

from .conftest import BUILDERS

CALIB = torch.randint(3, 512, (4, 24), generator=torch.Generator().manual_seed(1))
INPUT = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(2))
ATOL = 1e-5
_PRUNED: dict = {}


def pruned(family: str, binding: str = "shared"):
    """A tiny model pruned to 2:4 with RIA permutations, and its report (cached; callers get copies)."""
    key = (family, binding)
    if key not in _PRUNED:
        torch.set_num_threads(1)
        model = BUILDERS[family]()
        report = prune(model, None, PruneConfig(perm="ria", binding=binding, seqlen=24, nsamples=4),
                       calibration=CALIB, progress=False)
        _PRUNED[key] = model, report
    model, report = _PRUNED[key]
    return copy.deepcopy(model), copy.deepcopy(report)


def logits(model):
    with torch.no_grad():
        return model(INPUT).logits


def plain(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


def consumers(model) -> set[str]:
    """Full names of the linears fed by producers (attention output, MLP down): they fold under shared binding."""
    adapter = adapter_for(model)
    rels = {c for c, _ in adapter.producers}
    return {f"{adapter.blocks_path}.{i}.{r}" for i in range(len(adapter.blocks(model))) for r in rels}


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_masked_and_folded_exports_reload_to_the_pruned_logits(family, tmp_path):
    model, report = pruned(family)
    expected = logits(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    masked = export_checkpoint(model, None, tmp_path / "masked", report)
    torch.testing.assert_close(logits(plain(masked)), expected, atol=0, rtol=0)
    assert read_metadata(masked)["format"] == "masked"

    folded = export_checkpoint(model, None, tmp_path / "folded", report, export_format="folded")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model is untouched
    reloaded = plain(folded)
    torch.testing.assert_close(logits(reloaded), expected, atol=ATOL, rtol=1e-4)

    meta = read_metadata(folded)
    fold = meta["fold"]
    assert meta["format"] == "folded" and meta["loading"]["plain_hf"] is True
    assert set(fold["folded"]) == consumers(model)  # o/down (and kin) fold under shared binding
    assert all("residual reader" in reason for reason in fold["not_folded"].values())
    assert fold["folded_share"] == pytest.approx(len(fold["folded"]) / len(report.layers))
    assert 0 < fold["folded_share"] < 1 and fold["storage_nm_share"] == fold["folded_share"]
    for name, (layout, perm) in storage_permutations(meta).items():
        weight = linear_weight(reloaded.get_submodule(name))
        if layout == "nm":
            assert is_nm(weight, 2, 4), name
        else:
            assert layout == "masked" and is_nm(weight[:, perm], 2, 4), name
    assert not all(is_nm(linear_weight(reloaded.get_submodule(n)), 2, 4) for n in fold["not_folded"])
    for folder in (masked, folded):
        assert check_checkpoint(folder).ok


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_runtime_gather_export_needs_permsparse_load(family, tmp_path):
    model, report = pruned(family)
    expected = logits(model)
    out = export_checkpoint(model, None, tmp_path / "gather", report, export_format="folded", fallback="gather")
    meta = read_metadata(out)
    assert meta["loading"]["plain_hf"] is False and "permsparse.deploy.load" in meta["loading"]["note"]
    assert meta["fold"]["storage_nm_share"] == 1.0
    assert sorted(meta["fold"]["gathered"]) == sorted(meta["fold"]["not_folded"])
    deployed = load(out)
    assert sorted(deployed.permsparse_deploy["gathers"]) == sorted(meta["fold"]["gathered"])
    torch.testing.assert_close(logits(deployed), expected, atol=ATOL, rtol=1e-4)
    for layer in report.layers:  # everything is 2:4 in storage order
        assert is_nm(linear_weight(deployed.get_submodule(layer["name"])), 2, 4), layer["name"]
    assert not torch.allclose(logits(plain(out)), expected, atol=1e-3)  # plain HF loading is not exact here
    assert check_checkpoint(out).ok
    assert "permsparse_gather" not in deployed.state_dict() and "gather" not in json.dumps(list(deployed.state_dict()))


@pytest.mark.parametrize("fallback", ["masked", "gather"])
def test_global_hidden_permutation_export(fallback, tmp_path):
    """With a global hidden permutation unequal to the readers' own, readers stay exact through argsort(h)[p]."""
    model, report = pruned("llama")
    expected = logits(model)
    hidden = torch.randperm(64, generator=torch.Generator().manual_seed(4))
    out = export_checkpoint(model, None, tmp_path / "h", report, export_format="folded", fallback=fallback,
                            hidden_perm=hidden)
    meta = read_metadata(out)
    assert meta["fold"]["hidden_perm_applied"] and set(meta["fold"]["folded"]) == consumers(model)
    torch.testing.assert_close(logits(load(out)), expected, atol=ATOL, rtol=1e-4)
    if fallback == "masked":
        torch.testing.assert_close(logits(plain(out)), expected, atol=ATOL, rtol=1e-4)
    assert check_checkpoint(out).ok


def test_per_linear_binding_reports_why_attention_output_does_not_fold(tmp_path):
    model, report = pruned("llama", binding="per-linear")
    expected = logits(model)
    out = export_checkpoint(model, None, tmp_path / "f", report, export_format="folded")
    fold = read_metadata(out)["fold"]
    assert all(name.endswith("mlp.down_proj") for name in fold["folded"]) and fold["folded"]
    o_proj = fold["not_folded"]["model.layers.0.self_attn.o_proj"]
    assert "crosses heads" in o_proj or "kv head" in o_proj
    torch.testing.assert_close(logits(plain(out)), expected, atol=ATOL, rtol=1e-4)
    assert check_checkpoint(out).ok


def _tamper_weight(folder, name: str, perm: torch.Tensor | None = None) -> None:
    """Make one pruned-away weight (a zero in a group already holding 2 non-zeros) non-zero."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    key = name + ".weight"
    weight = tensors[key]
    view = weight if perm is None else weight[:, perm]
    row, col = (view == 0).nonzero()[0].tolist()
    col = col if perm is None else int(perm[col])
    weight[row, col] = 1.0
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("layout", ["nm", "masked", "gather"])
def test_check_fails_naming_the_tampered_layer(layout, tmp_path):
    model, report = pruned("llama")
    fallback = "gather" if layout == "gather" else "masked"
    out = export_checkpoint(model, None, tmp_path / "f", report, export_format="folded", fallback=fallback)
    layouts = storage_permutations(read_metadata(out))
    name = next(n for n, (lay, _) in layouts.items() if lay == layout and "layers.1." in n)
    _tamper_weight(out, name, layouts[name][1] if layout == "masked" else None)
    result = check_checkpoint(out)
    assert not result.ok and result.layers[name] != "ok"
    assert [f for f in result.failures if f.startswith(name + ":")]
    assert sum(v != "ok" for v in result.layers.values()) == 1
    with pytest.raises(CheckFailed, match=name.replace(".", r"\.")):
        result.raise_for_failure()
    code, messages = check_command(out)
    assert code == 1 and any(name in line for line in messages)


def test_check_fails_on_tampered_reference_logits(tmp_path):
    model, report = pruned("llama")
    out = export_checkpoint(model, None, tmp_path / "f", report, export_format="folded")
    assert check_command(out)[0] == 0
    meta = read_metadata(out)
    meta["reference"]["logits"]["sample"][3] += 0.01 * meta["reference"]["logits"]["max_abs"]
    (out / "permsparse.json").write_text(json.dumps(meta))
    result = check_checkpoint(out)
    assert not result.ok and not result.logits_ok and result.failures[0].startswith("logits")
    assert all(v == "ok" for v in result.layers.values())
    assert check_command(out)[0] == 1
    assert check_command(tmp_path)[0] == 2  # no permsparse.json: not a checkpoint


def test_export_refuses_to_overwrite(tmp_path):
    model, report = pruned("llama")
    out = tmp_path / "f"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for fmt in ("masked", "folded"):
        with pytest.raises(FileExistsError, match="exists"):
            export_checkpoint(model, None, out, report, export_format=fmt)
    with pytest.raises(FileExistsError):
        save_checkpoint(model, None, out, {"format": "masked"})
    assert (out / "keep.txt").read_text() == "mine"
    export_checkpoint(model, None, out, report, export_format="folded", overwrite=True)
    assert not (out / "keep.txt").exists() and not (tmp_path / "f.partial").exists()
    assert check_checkpoint(out).ok


def test_bad_export_options_fail_before_writing(tmp_path):
    model, report = pruned("llama")
    with pytest.raises(ValueError, match="export format"):
        export_checkpoint(model, None, tmp_path / "a", report, export_format="dense")
    with pytest.raises(ValueError, match="fallback"):
        export_checkpoint(model, None, tmp_path / "a", report, export_format="folded", fallback="drop")
    unstructured = {**vars(report), "config": {**report.config, "pattern": "50%"}}
    with pytest.raises(ValueError, match="unstructured"):
        export_checkpoint(model, None, tmp_path / "a", unstructured, export_format="folded")
    assert not (tmp_path / "a").exists()


def test_semi_structured_without_gpu_warns_and_keeps_dense(tmp_path):
    model, report = pruned("llama")
    out = export_checkpoint(model, None, tmp_path / "f", report, export_format="folded")
    if torch.cuda.is_available():
        pytest.skip("this test is about machines without a CUDA GPU")
    with pytest.warns(RuntimeWarning, match="needs a CUDA GPU"):
        deployed = load(out, semi_structured=True)
    info = deployed.permsparse_deploy["semi_structured"]
    assert info["converted"] == [] and len(info["not_converted"]) == len(report.layers)
    masked = [n for n, (lay, _) in storage_permutations(read_metadata(out)).items() if lay == "masked"]
    assert masked and all("masked layout" in info["not_converted"][n] for n in masked)
    assert all("CUDA GPU" in info["not_converted"][n] for n in read_metadata(out)["fold"]["folded"])
    torch.testing.assert_close(logits(deployed), logits(model), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_global_binding_folds_every_pruned_linear(family, tmp_path):
    """With one hidden permutation for all residual readers, every permutation folds: the whole model is
    N:M in storage order, as a plain HF checkpoint with the masked model's logits."""
    model = BUILDERS[family]()
    tokens = torch.randint(3, 512, (4, 24), generator=torch.Generator().manual_seed(5))
    report = prune(model, None, PruneConfig(perm="ria", binding="global", seqlen=24, nsamples=4),
                   calibration=tokens, progress=False)
    assert report.hidden_permutation is not None
    assert sorted(report.hidden_permutation) == list(range(len(report.hidden_permutation)))
    out = export_checkpoint(model, None, tmp_path / "g", asdict(report), export_format="folded",
                            hidden_perm=report.hidden_permutation)
    meta = json.loads((out / "permsparse.json").read_text())
    assert meta["fold"]["storage_nm_share"] == 1.0 and not meta["fold"]["not_folded"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    x = torch.randint(3, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, atol=1e-5, rtol=1e-5)
    assert check_checkpoint(out).ok
