"""Exact export of permuted sparse models: masked, folded, runtime gathers; the checkpoint check."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from permsparse import ExportConfig, PruneConfig, Search, check_checkpoint, export_checkpoint, load, prune
from permsparse.discover.adapters import adapter_for, linear_weight
from permsparse.checkpoint.check import CheckFailed
from permsparse.checkpoint.record import read_record
from permsparse.cli import main
from permsparse.sparsity.masks import is_nm
from permsparse.serial import RecordError

from .conftest import BUILDERS, CALIB, INPUT

ATOL = 1e-5
FOLDED, GATHER = ExportConfig("folded"), ExportConfig("folded", "gather")


@pytest.fixture(scope="module")
def pruned_models():
    """Tiny models pruned to 2:4 with RIA permutations, by (family, binding), built once per module."""
    cache = {}

    def get(family: str, binding: str = "shared"):
        if (family, binding) not in cache:
            config = PruneConfig(permutation=Search("ria"), binding=binding)
            model = BUILDERS[family]()
            cache[family, binding] = model, config, prune(model, None, config, windows=CALIB[:4], progress=False)
        model, config, report = cache[family, binding]
        return copy.deepcopy(model), config, copy.deepcopy(report)

    return get


def export(model, config, report, out, export=ExportConfig(), **kwargs):
    return export_checkpoint(model, None, out, config, report, export=export, **kwargs)


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
def test_masked_and_folded_exports_reload_to_the_pruned_logits(family, tmp_path, pruned_models):
    model, config, report = pruned_models(family)
    expected = logits(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    masked = export(model, config, report, tmp_path / "masked")
    torch.testing.assert_close(logits(plain(masked)), expected, atol=0, rtol=0)
    record = read_record(masked)
    assert record.export == "masked" and record.config == config and record.report == report

    folded = export(model, config, report, tmp_path / "folded", FOLDED)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # the caller's model is untouched
    reloaded = plain(folded)
    torch.testing.assert_close(logits(reloaded), expected, atol=ATOL, rtol=1e-4)

    record = read_record(folded)
    fold = record.fold
    assert record.export == "folded" and record.plain_hf and "max relative error" in fold.verified
    assert set(fold.folded) == consumers(model)  # o/down (and kin) fold under shared binding
    assert all("residual reader" in reason for reason in fold.not_folded.values())
    assert fold.folded_share == pytest.approx(len(fold.folded) / len(report.layers))
    assert 0 < fold.folded_share < 1 and fold.storage_nm_share == fold.folded_share
    for name, entry in record.layouts.items():
        weight = linear_weight(reloaded.get_submodule(name))
        if entry.layout == "nm":
            assert is_nm(weight, 2, 4), name
        else:
            assert entry.layout == "masked" and is_nm(weight[:, torch.tensor(entry.perm)], 2, 4), name
    assert not all(is_nm(linear_weight(reloaded.get_submodule(n)), 2, 4) for n in fold.not_folded)
    for folder in (masked, folded):
        assert check_checkpoint(folder).ok


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_runtime_gather_export_needs_permsparse_load(family, tmp_path, pruned_models):
    model, config, report = pruned_models(family)
    expected = logits(model)
    out = export(model, config, report, tmp_path / "gather", GATHER)
    record = read_record(out)
    assert not record.plain_hf and record.fold.storage_nm_share == 1.0
    assert sorted(record.fold.gathered) == sorted(record.fold.not_folded)
    deployed = load(out)
    assert sorted(deployed.permsparse_deploy["gathers"]) == sorted(record.fold.gathered)
    torch.testing.assert_close(logits(deployed), expected, atol=ATOL, rtol=1e-4)
    for layer in report.layers:  # everything is 2:4 in storage order
        assert is_nm(linear_weight(deployed.get_submodule(layer.name)), 2, 4), layer.name
    assert not torch.allclose(logits(plain(out)), expected, atol=1e-3)  # plain HF loading is not exact here
    assert check_checkpoint(out).ok
    assert "permsparse_gather" not in json.dumps(list(deployed.state_dict()))


@pytest.mark.parametrize("fallback", ["masked", "gather"])
def test_a_hidden_permutation_unequal_to_the_readers_keeps_them_exact(fallback, tmp_path, pruned_models):
    """With a global hidden permutation unequal to the readers' own, readers stay exact through argsort(h)[p]."""
    model, config, report = pruned_models("llama")
    expected = logits(model)
    report.hidden_perm = torch.randperm(64, generator=torch.Generator().manual_seed(4)).tolist()
    out = export(model, config, report, tmp_path / "h", ExportConfig("folded", fallback))
    fold = read_record(out).fold
    assert fold.hidden_perm_applied and set(fold.folded) == consumers(model)
    torch.testing.assert_close(logits(load(out)), expected, atol=ATOL, rtol=1e-4)
    if fallback == "masked":
        torch.testing.assert_close(logits(plain(out)), expected, atol=ATOL, rtol=1e-4)
    assert check_checkpoint(out).ok


def test_per_linear_binding_reports_why_attention_output_does_not_fold(tmp_path, pruned_models):
    model, config, report = pruned_models("llama", binding="per-linear")
    expected = logits(model)
    out = export(model, config, report, tmp_path / "f", FOLDED)
    fold = read_record(out).fold
    assert all(name.endswith("mlp.down_proj") for name in fold.folded) and fold.folded
    o_proj = fold.not_folded["model.layers.0.self_attn.o_proj"]
    assert "crosses heads" in o_proj or "kv head" in o_proj
    torch.testing.assert_close(logits(plain(out)), expected, atol=ATOL, rtol=1e-4)
    assert check_checkpoint(out).ok


def _tamper_weight(folder, name: str, perm: list[int] | None = None) -> None:
    """Make one pruned-away weight (a zero in a group already holding 2 non-zeros) non-zero."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    weight = tensors[name + ".weight"]
    view = weight if perm is None else weight[:, torch.tensor(perm)]
    row, col = (view == 0).nonzero()[0].tolist()
    weight[row, col if perm is None else perm[col]] = 1.0
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("layout", ["nm", "masked", "gather"])
def test_check_fails_naming_the_tampered_layer(layout, tmp_path, pruned_models, capsys):
    model, config, report = pruned_models("llama")
    out = export(model, config, report, tmp_path / "f", GATHER if layout == "gather" else FOLDED)
    layouts = read_record(out).layouts
    name = next(n for n, entry in layouts.items() if entry.layout == layout and "layers.1." in n)
    _tamper_weight(out, name, layouts[name].perm if layout == "masked" else None)
    result = check_checkpoint(out)
    assert not result.ok and result.layers[name] != "ok"
    assert [f for f in result.failures if f.startswith(name + ":")]
    assert sum(v != "ok" for v in result.layers.values()) == 1
    with pytest.raises(CheckFailed, match=name.replace(".", r"\.")):
        result.raise_for_failure()
    assert main(["check", str(out)]) == 1 and name in capsys.readouterr().err


def test_check_fails_on_tampered_reference_logits_and_malformed_records(tmp_path, pruned_models):
    model, config, report = pruned_models("llama")
    out = export(model, config, report, tmp_path / "f", FOLDED)
    assert main(["check", str(out)]) == 0
    meta = json.loads((out / "permsparse.json").read_text())
    meta["reference"]["logits"]["sample"][3] += 0.01 * meta["reference"]["logits"]["max_abs"]
    (out / "permsparse.json").write_text(json.dumps(meta))
    result = check_checkpoint(out)
    assert not result.ok and result.failures[0].startswith("logits")
    assert all(v == "ok" for v in result.layers.values())
    assert main(["check", str(out)]) == 1
    assert main(["check", str(tmp_path)]) == 2  # no permsparse.json: not a checkpoint
    for broken, message in [({k: v for k, v in meta.items() if k != "layouts"}, "missing field"),
                            ({**meta, "extra": 1}, "unknown field"),
                            ({**meta, "config": {**meta["config"], "pattern": None}}, "config.pattern"),
                            ({**meta, "format_version": 0}, "format version")]:
        (out / "permsparse.json").write_text(json.dumps(broken))
        with pytest.raises(RecordError, match=message):
            read_record(out)


def test_export_refuses_to_overwrite(tmp_path, pruned_models):
    model, config, report = pruned_models("llama")
    out = tmp_path / "f"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for fmt in (ExportConfig(), FOLDED):
        with pytest.raises(FileExistsError, match="exists"):
            export(model, config, report, out, fmt)
    assert (out / "keep.txt").read_text() == "mine"
    export(model, config, report, out, FOLDED, overwrite=True)
    assert not (out / "keep.txt").exists() and not (tmp_path / "f.partial").exists()
    assert check_checkpoint(out).ok


def test_bad_export_options_fail_before_writing(tmp_path, pruned_models):
    model, config, report = pruned_models("llama")
    with pytest.raises(ValueError, match="unknown format"):
        ExportConfig("dense")
    with pytest.raises(ValueError, match="unknown fallback"):
        ExportConfig("folded", "drop")
    with pytest.raises(ValueError, match="unstructured"):
        export(model, PruneConfig(pattern="50%"), report, tmp_path / "a", FOLDED)
    assert not (tmp_path / "a").exists()


def test_semi_structured_without_gpu_warns_and_keeps_dense(tmp_path, pruned_models):
    model, config, report = pruned_models("llama")
    out = export(model, config, report, tmp_path / "f", FOLDED)
    if torch.cuda.is_available():
        pytest.skip("this test is about machines without a CUDA GPU")
    with pytest.warns(RuntimeWarning, match="needs a CUDA GPU"):
        deployed = load(out, semi_structured=True)
    info = deployed.permsparse_deploy["semi_structured"]
    assert info["converted"] == [] and len(info["not_converted"]) == len(report.layers)
    record = read_record(out)
    masked = [n for n, entry in record.layouts.items() if entry.layout == "masked"]
    assert masked and all("masked layout" in info["not_converted"][n] for n in masked)
    assert all("CUDA GPU" in info["not_converted"][n] for n in record.fold.folded)
    torch.testing.assert_close(logits(deployed), logits(model), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_global_binding_folds_every_pruned_linear(family, tmp_path):
    """With one hidden permutation for all residual readers, every permutation folds: the whole model is
    N:M in storage order, as a plain HF checkpoint with the masked model's logits."""
    model = BUILDERS[family]()
    config = PruneConfig(permutation=Search("ria"), binding="global")
    report = prune(model, None, config, windows=CALIB[:4], progress=False)
    assert sorted(report.hidden_perm) == list(range(len(report.hidden_perm)))
    out = export(model, config, report, tmp_path / "g", FOLDED)
    fold = read_record(out).fold
    assert fold.storage_nm_share == 1.0 and not fold.not_folded
    torch.testing.assert_close(logits(plain(out)), logits(model), atol=1e-5, rtol=1e-5)
    assert check_checkpoint(out).ok
