"""Compressed checkpoints: N:M kept values + packed positions (or quantized codes + scales), exact reloads."""
import copy
import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from permsparse import ExportConfig, PruneConfig, Search, check_checkpoint, export_checkpoint, load, prune
from permsparse.discover.adapters import linear_weight
from permsparse.checkpoint.compressed import (StoredWeight, attach_stored, read_stored, store_linear, stored_from_tensors,
                                              write_stored)
from permsparse.checkpoint.record import read_record
from permsparse.cli import main
from permsparse.deploy.format import compress_nm, decompress_nm, position_bits, position_problem
from permsparse.quant import QuantizedWeight, attach

from .conftest import BUILDERS, CALIB, INPUT
from .test_cli import prune_args

COMPRESSED = ExportConfig("compressed")


def random_nm(rows: int, width: int, n: int, m: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A random weight keeping exactly ``n`` of every ``m`` inputs, some groups keeping fewer."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(rows, width // m, m, generator=g).argsort(-1)[..., :n]
    mask = torch.zeros(rows, width // m, m, dtype=torch.bool).scatter_(-1, keep, True).reshape(rows, width)
    weight = torch.randn(rows, width, generator=g) * mask
    weight[0, :m] = 0.0  # a group keeping nothing
    return weight.to(dtype)


@pytest.fixture(scope="module")
def pruned():
    """Tiny models pruned with RIA permutations, by (family, binding, pattern), built once per module."""
    cache = {}

    def get(family: str, binding: str = "shared", pattern: str = "2:4"):
        key = family, binding, pattern
        if key not in cache:
            config = PruneConfig(pattern=pattern, permutation=Search("ria"), binding=binding)
            model = BUILDERS[family]()
            cache[key] = model, config, prune(model, None, config, windows=CALIB[:4], progress=False)
        model, config, report = cache[key]
        return copy.deepcopy(model), config, copy.deepcopy(report)

    return get


def logits(model):
    with torch.no_grad():
        return model(INPUT).logits


# --- the N:M layout ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8), (1, 2), (2, 5)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.float8_e4m3fn])
def test_nm_layout_round_trip_is_exact(n, m, dtype):
    weight = random_nm(6, m * 5, n, m, torch.float32, seed=n * m)
    weight = (weight * 8).to(dtype) if dtype == torch.int8 else weight.to(dtype)
    values, positions = compress_nm(weight, n, m)
    kept = m * 5 // m * n
    assert values.shape == (6, kept) and values.dtype == dtype
    assert positions.shape == (6, -(-kept * position_bits(m) // 8)) and positions.dtype == torch.uint8
    assert position_problem(positions, kept, n, m) == ""
    assert torch.equal(decompress_nm(values, positions, n, m).float(), weight.float())
    transposed = torch.empty(m * 5, 6, dtype=dtype)  # written through a transposed view (GPT-2's Conv1D)
    decompress_nm(values, positions, n, m, out=transposed.t())
    assert torch.equal(transposed.t().float(), weight.float())


def test_positions_naming_a_slot_twice_or_outside_the_group_are_caught():
    values, positions = compress_nm(random_nm(4, 32, 2, 4), 2, 4)
    bad = positions.clone()
    bad[1, 0] = 0b0101  # row 1, group 0 keeps position 1 twice
    assert "not 2 distinct increasing positions" in position_problem(bad, 16, 2, 4)
    values, positions = compress_nm(random_nm(4, 40, 2, 5), 2, 5)  # 3 bits name positions 0..7 of a group of 5
    bad = positions.clone()
    bad[2, 0] = 0b111
    assert "outside its group of 5" in position_problem(bad, 16, 2, 5)
    with pytest.raises(ValueError, match="not 2:4 in storage order"):
        compress_nm(torch.ones(2, 8), 2, 4)


# --- exact reloads -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family,binding", [("llama", "shared"), ("llama", "per-linear"), ("gpt2", "shared"),
                                            ("gpt2", "per-linear"), ("opt", "shared"), ("opt", "per-linear")])
def test_compressed_bf16_reloads_bitwise_to_the_masked_export(family, binding, tmp_path, pruned):
    model, config, report = pruned(family, binding)
    masked = export_checkpoint(model, None, tmp_path / "masked", config, report,
                               export=ExportConfig(save_dtype="bfloat16"))
    folder = export_checkpoint(model, None, tmp_path / "compressed", config, report, export=COMPRESSED)
    expected = logits(AutoModelForCausalLM.from_pretrained(masked).eval())
    loaded = load(folder)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert torch.equal(logits(loaded), expected)
    record = read_record(folder)
    assert record.export == "compressed" and record.storage.format == "compressed" and record.storage.dtype == "bfloat16"
    stored = 0
    for layer in report.layers:  # every pruned linear keeps its stored form, no dense parameter
        module = loaded.get_submodule(layer.name)
        assert isinstance(module.stored, StoredWeight) and "weight" not in module._parameters
        assert module.stored.spec.ordered == (record.layouts[layer.name].layout == "masked")
        stored += module.stored.nbytes
    assert stored == record.storage.pruned_bytes
    dense = load(folder, dense=True)  # ordinary modules with ordinary parameters, the same function
    assert all("weight" in dense.get_submodule(layer.name)._parameters for layer in report.layers)
    assert torch.equal(logits(dense), expected)
    result = check_checkpoint(folder)
    assert result.ok and "bit-identical" in result.logits, result.lines()


@pytest.mark.parametrize("pattern", ["4:8", "1:4"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_other_patterns_and_dtypes_reload_exactly(pattern, dtype, tmp_path, pruned):
    model, config, report = pruned("llama", "per-linear", pattern)
    masked = export_checkpoint(model, None, tmp_path / "masked", config, report, export=ExportConfig(save_dtype=dtype))
    folder = export_checkpoint(model, None, tmp_path / "compressed", config, report,
                               export=ExportConfig("compressed", save_dtype=dtype))
    assert torch.equal(logits(load(folder)), logits(AutoModelForCausalLM.from_pretrained(masked).eval()))
    specs, _, _ = read_stored(folder)
    n, m = config.nm
    assert {tuple(spec.pattern) for spec in specs.values()} == {(n, m)} and {s.dtype for s in specs.values()} == {dtype}
    assert check_checkpoint(folder).ok


def test_byte_ratios_of_the_stored_linears(tmp_path, pruned):
    """2:4 bf16 without input orders is 9/16 of the dense bytes exactly; with orders, plus 2 bytes an input."""
    model, _, _ = pruned("llama")
    config = PruneConfig(permutation=Search("none"))
    report = prune(model, None, config, windows=CALIB[:4], progress=False)
    folder = export_checkpoint(model, None, tmp_path / "c", config, report, export=COMPRESSED)
    storage = read_record(folder).storage
    assert storage.pruned_ratio == pytest.approx(0.5625, abs=1e-12)
    dense = export_checkpoint(model, None, tmp_path / "d", config, report, export=ExportConfig(save_dtype="bfloat16"))
    dense_storage = read_record(dense).storage
    assert dense_storage.pruned_ratio == 1.0 and dense_storage.format == "dense"
    assert storage.weights_bytes < dense_storage.weights_bytes
    model, config, report = pruned("llama", "per-linear", "4:8")  # 4 kept of 8 with 3-bit positions: 0.5 + 0.09375
    folder = export_checkpoint(model, None, tmp_path / "48", config, report, export=COMPRESSED)
    specs, _, _ = read_stored(folder)
    orders = sum(2 * spec.shape[1] for spec in specs.values() if spec.ordered)
    entries = sum(spec.shape[0] * spec.shape[1] for spec in specs.values())
    assert read_record(folder).storage.pruned_bytes == entries * (0.5 + 0.09375) * 2 + orders


# --- quantized storage -------------------------------------------------------------------------------------------

def quantized_record(kind: str, weight: torch.Tensor, group: int, order: torch.Tensor | None,
                     narrow_scales: torch.dtype | None) -> QuantizedWeight:
    """Symmetric codes of ``weight[:, order]`` (a plain round-to-nearest, built here)."""
    stored = weight if order is None else weight[:, order]
    rows, width = stored.shape
    top = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}[kind]
    scales = stored.reshape(rows, width // group, group).abs().amax(-1).clamp_min(1e-8) / top
    if narrow_scales is not None:  # scales exact in a 16-bit type (the quantizers' are exact in bfloat16)
        scales = scales.to(narrow_scales).float()
    scaled = stored / scales.repeat_interleave(group, 1)
    codes = scaled.to(torch.float8_e4m3fn) if kind == "fp8" else scaled.round().clamp(-top - 1, top).to(torch.int8)
    return QuantizedWeight(kind, codes, scales, group, order)


@pytest.mark.parametrize("kind", ["int8", "fp8", "int4"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8), None])
@pytest.mark.parametrize("narrow_scales", [torch.bfloat16, torch.float16, None])
def test_quantized_storage_round_trips_codes_and_scales_exactly(kind, nm, narrow_scales, tmp_path):
    out, width, group = 12, 64, 16
    order = torch.randperm(width, generator=torch.Generator().manual_seed(1))
    stored_order = random_nm(out, width, *nm) if nm else torch.randn(out, width)
    weight = torch.empty_like(stored_order)
    weight[:, order] = stored_order  # N:M through the input order, as a permuted pruning leaves it
    record = quantized_record(kind, weight, group, order, narrow_scales)
    stored = store_linear(record.weight(torch.bfloat16), nm=nm, order=None, quantized=record, dtype=torch.bfloat16)
    assert stored.spec.scales == str(narrow_scales or torch.float32).removeprefix("torch.")
    write_stored(tmp_path, stored.tensors("lin"), {"lin": stored.spec}, {}, 10**9)
    specs, _, files = read_stored(tmp_path)
    with safe_open(files[0], framework="pt") as f:
        back = stored_from_tensors("lin", specs["lin"], lambda key: f.get_tensor(key) if key in f.keys() else None)
    assert back.problem() == ""
    assert torch.equal(back._scales().float(), record.scales)
    codes = torch.cat([back._stored_rows(r, r + 1) for r in range(out)])
    assert torch.equal(codes.float(), record.codes.float()) and torch.equal(back.input_order.long(), order)
    for dtype in (torch.bfloat16, torch.float32):
        assert torch.equal(back.expand(dtype), record.weight(dtype))
    bits = {"int8": 8, "fp8": 8, "int4": 4}[kind]
    kept = width if nm is None else width // nm[1] * nm[0]
    positions = 0 if nm is None else -(-kept * position_bits(nm[1]) // 8)
    assert back.nbytes == out * (kept * bits // 8 + positions + width // group * (2 if narrow_scales else 4)) + 2 * width


def test_a_quantized_compressed_export_reloads_and_checks_exactly(tmp_path, pruned):
    model, config, report = pruned("llama", "per-linear")
    perms = {name: torch.as_tensor(site.perm) for site in report.sites for name in site.linears}
    records = {}
    for layer in report.layers:
        module = model.get_submodule(layer.name)
        weight = linear_weight(module)
        records[layer.name] = quantized_record("int4", weight.detach(), 16, perms.get(layer.name), torch.float16)
        with torch.no_grad():
            weight.copy_(records[layer.name].weight(torch.float32))
        attach(module, records[layer.name])
    folder = export_checkpoint(model, None, tmp_path / "q", config, report, export=COMPRESSED)
    storage = read_record(folder).storage
    assert storage.quantization == "int4" and storage.group == 16
    loaded = load(folder)
    for name, record in records.items():  # the dequantized weights, exactly
        assert torch.equal(linear_weight(loaded.get_submodule(name)), record.weight(torch.bfloat16))
    result = check_checkpoint(folder)
    assert result.ok and "bit-identical" in result.logits, result.lines()
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["weights"] == "int4"


# --- refusals and tampering --------------------------------------------------------------------------------------

def test_plain_from_pretrained_refuses_a_compressed_folder(tmp_path, pruned):
    model, config, report = pruned("llama")
    folder = export_checkpoint(model, None, tmp_path / "c", config, report, export=COMPRESSED)
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == "permsparse"
    with pytest.raises(ValueError, match=r"permsparse\.load\(DIR\)"):  # permsparse imported: one line naming it
        AutoModelForCausalLM.from_pretrained(folder)
    code = f"from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained({str(folder)!r}); print('LOADED')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "LOADED" not in run.stdout  # transformers alone: no weights file, no random model
    assert "no file named model.safetensors" in run.stderr and "got permsparse" in run.stderr


def rewrite(folder, edit):
    """Apply ``edit(tensors, header)`` to the compressed weights file of ``folder``."""
    path = folder / "model.permsparse.safetensors"
    with safe_open(path, framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
        header = json.loads(f.metadata()["permsparse"])
    edit(tensors, header)
    save_file(tensors, path, metadata={"format": "pt", "permsparse": json.dumps(header)})


def test_check_catches_a_tampered_value_positions_and_metadata(tmp_path, pruned, capsys):
    model, config, report = pruned("llama", "per-linear")
    name = "model.layers.1.mlp.down_proj"
    folder = export_checkpoint(model, None, tmp_path / "c", config, report, export=COMPRESSED)
    assert main(["check", str(folder)]) == 0

    def scale_a_value(tensors, header):
        tensors[f"{name}.weight.values"][3, 5] *= 1.5

    def repeat_a_position(tensors, header):
        tensors[f"{name}.weight.positions"][0, 0] = 0b0101

    def claim_another_pattern(tensors, header):
        header["linears"][name]["pattern"] = [1, 4]

    for edit, message in [(scale_a_value, "differs from the one recorded at export"),
                          (repeat_a_position, "not 2 distinct increasing positions"),
                          (claim_another_pattern, "values of shape")]:
        broken = tmp_path / edit.__name__
        export_checkpoint(model, None, broken, config, report, export=COMPRESSED)
        rewrite(broken, edit)
        result = check_checkpoint(broken)
        assert not result.ok and any(f.startswith(name) and message in f for f in result.failures), result.failures
        assert main(["check", str(broken)]) == 1
        assert name in capsys.readouterr().err


def test_bad_export_input_is_refused_and_nothing_is_half_written(tmp_path, tiny_llama_dir, pruned, capsys):
    assert main(prune_args(tiny_llama_dir, tmp_path / "u", "--pattern", "50%", "--export", "compressed")) == 2
    assert "compressed export stores N:M or quantized linears" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()
    with pytest.raises(SystemExit):
        main(prune_args(tiny_llama_dir, tmp_path / "d", "--export", "compressed", "--save-dtype", "float64"))
    assert "invalid choice: 'float64'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown save dtype 'int8'"):
        ExportConfig("compressed", save_dtype="int8")
    model, config, report = pruned("llama")
    name = report.layers[0].name
    perm = next(torch.as_tensor(site.perm) for site in report.sites if name in site.linears)
    module = model.get_submodule(name)
    weight = linear_weight(module)
    attach(module, quantized_record("int8", weight.detach(), 64, None, None))  # not 2:4 in the identity order
    with pytest.raises(ValueError, match=f"{name}: cannot be stored compressed: not 2:4 in storage order"):
        export_checkpoint(model, None, tmp_path / "x", config, report, export=COMPRESSED)
    attach(module, quantized_record("int8", weight.detach(), 64, perm, None))  # codes that are not the weight
    with pytest.raises(RuntimeError, match="does not expand to the model's weight"):
        export_checkpoint(model, None, tmp_path / "x", config, report, export=COMPRESSED)
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_a_stored_module_expands_only_while_used():
    layer = torch.nn.Linear(16, 8, bias=True)
    with torch.no_grad():
        layer.weight.copy_(random_nm(8, 16, 2, 4))
    x = torch.randn(3, 16)
    expected = layer(x)
    stored = store_linear(layer.weight.detach(), nm=(2, 4), order=None, quantized=None, dtype=torch.float32)
    attach_stored(layer, stored)
    assert isinstance(layer, torch.nn.Linear) and "weight" not in layer._parameters
    assert torch.equal(layer(x), expected)
    assert {name for name, _ in layer.named_parameters()} == {"bias"}


def test_prune_check_and_eval_a_compressed_checkpoint_from_the_command_line(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(prune_args(tiny_llama_dir, out, "--perm", "ria", "--export", "compressed")) == 0
    record = json.loads((out / "permsparse.json").read_text())
    assert record["export"] == "compressed" and record["storage"]["dtype"] == "bfloat16"
    assert not (out / "model.safetensors").exists() and (out / "model.permsparse.safetensors").is_file()
    assert main(["check", str(out)]) == 0
    assert "storage: compressed bfloat16" in capsys.readouterr().out
    result = tmp_path / "eval.json"
    assert main(["eval", str(out), "--seqlen", "64", "--windows", "2", "--json", str(result)]) == 0
    assert json.loads(result.read_text())["perplexity"]["ppl"] > 1


# --- GPU 2:4 modules made from the stored form (their kernels run under Triton's interpreter here) -----------------

@pytest.fixture
def interpreted(monkeypatch):
    """The Triton kernels of permsparse.deploy.triton_decode run by Triton's CPU interpreter (skipped without Triton,
    or when this process defined them for a GPU)."""
    import importlib
    import os

    pytest.importorskip("triton")
    defined = sys.modules.get("permsparse.deploy.triton_decode")
    if defined is not None and not defined.INTERPRETED:
        pytest.skip("the Triton kernels were defined for the GPU earlier in this process")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the kernels are defined and while they run
    return importlib.import_module("permsparse.deploy.triton_decode")


@pytest.mark.parametrize("quant", [None, "int4", "int8"], ids=["float32", "int4", "int8"])
def test_gpu_modules_made_from_the_stored_form_compute_what_the_stored_linears_compute(quant, interpreted, tmp_path):
    from permsparse.checkpoint.load import runtime_modules, stored_linears
    from permsparse import Quantization
    from permsparse.deploy.int4 import Int4Linear24
    from permsparse.deploy.linear import Linear24

    config = PruneConfig(permutation=Search("ria"), binding="per-linear",
                         quant=Quantization("none") if quant is None else Quantization(quant, 16, method="rtn"))
    model = BUILDERS["llama"]()
    report = prune(model, None, config, windows=CALIB[:2], progress=False)
    folder = export_checkpoint(model, None, tmp_path / "c", config, report,
                               export=ExportConfig("compressed", save_dtype="float32"))
    stored_model = load(folder)  # the CPU load: each linear expands for its own forward
    runtime_model = load(folder)
    stored = stored_linears(runtime_model)
    assert len(stored) == len(report.layers)
    assert any(s.stored.input_order is not None for s in stored.values())  # per-linear orders become input gathers
    done = runtime_modules(runtime_model, stored, (2, 4), "2:4", storages=("triton",))
    assert sorted(done["converted"]) == sorted(stored) and not done["not_converted"]
    kinds = {type(runtime_model.get_submodule(name)) for name in stored}
    assert kinds == ({Int4Linear24} if quant == "int4" else {Linear24})
    assert not stored_linears(runtime_model)
    # against dense bf16: float32 kept values 1 + 2-bit positions 0.0625 (int8 runs dequantized to the model's float32);
    # int4 codes 0.125 + positions 0.0625 + a bfloat16 scale per 16 inputs 0.0625
    assert done["bytes"]["ratio"] == pytest.approx({None: 1.0625, "int4": 0.25, "int8": 1.0625}[quant])
    for tokens in (INPUT[:, :5], INPUT):  # decode-sized calls run the kernel, longer ones (int4) the dequantized weight
        with torch.no_grad():
            expected = stored_model(tokens).logits
            got = runtime_model(tokens).logits
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_loading_on_a_machine_without_a_gpu_keeps_the_stored_form_and_says_why(tmp_path, pruned):
    if torch.cuda.is_available():
        pytest.skip("about machines without a CUDA GPU")
    model, config, report = pruned("llama")
    folder = export_checkpoint(model, None, tmp_path / "c", config, report, export=COMPRESSED)
    with pytest.warns(RuntimeWarning, match="needs a CUDA GPU"):
        loaded = load(folder, semi_structured=True)
    from permsparse.checkpoint.load import stored_linears

    assert len(stored_linears(loaded)) == len(report.layers)
    assert set(loaded.permsparse_deploy["semi_structured"]["not_converted"]) == set(stored_linears(loaded))


def test_the_skeleton_of_a_compressed_load_holds_no_weight_and_computes_its_buffers(monkeypatch):
    from permsparse.checkpoint import load as loading

    reference = BUILDERS["llama"]()
    model = loading._skeleton(reference.config, torch.float32)
    assert all(p.is_meta for p in model.parameters())  # no dense weight was allocated
    buffers = dict(model.named_buffers())
    assert buffers and all(torch.equal(buffers[name], b) for name, b in reference.named_buffers())  # rotary frequencies

    class EmptyBuffer(torch.nn.Module):  # a buffer made by torch.empty and filled: made again the old way
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(4, 4))
            self.register_buffer("table", torch.empty(3).fill_(2.0), persistent=False)

    class Builder:
        @staticmethod
        def from_config(config, dtype):
            return EmptyBuffer()

    monkeypatch.setattr(loading, "auto_class", lambda config: Builder)
    made = loading._skeleton(None, torch.float32)
    assert made.weight.is_meta and torch.equal(made.table, torch.full((3,), 2.0))


def test_inference_forwards_share_one_weight_buffer_and_never_touch_a_weight_handed_out(tmp_path, pruned, monkeypatch):
    from permsparse.checkpoint.load import stored_linears

    model, config, report = pruned("llama")
    folder = export_checkpoint(model, None, tmp_path / "c", config, report, export=COMPRESSED)
    loaded = load(folder)
    expected = logits(load(folder, dense=True))
    first, second = list(stored_linears(loaded).values())[:2]
    kept = first.weight  # outside a forward: a tensor of its own
    copy_of_kept = kept.clone()
    targets = []
    expand = StoredWeight.expand

    def recording(self, dtype=None, out=None, storage_order=False):
        targets.append(None if out is None else out.untyped_storage().data_ptr())
        return expand(self, dtype, out, storage_order)

    monkeypatch.setattr(StoredWeight, "expand", recording)
    assert torch.equal(logits(loaded), expected)  # the workspace grows to the largest linear in the first forward
    targets.clear()
    assert torch.equal(logits(loaded), expected)
    assert len(targets) == len(report.layers) and len(set(targets)) == 1 and None not in targets  # then one buffer
    assert torch.equal(kept, copy_of_kept)
    x = torch.randn(3, first.stored.spec.shape[1]).to(first.stored.dtype).requires_grad_()  # autograd: weights of their own
    y = first(x)
    second(torch.randn(3, second.stored.spec.shape[1]).to(second.stored.dtype))  # would overwrite a shared buffer
    y.sum().backward()
    torch.testing.assert_close(x.grad, first.weight.sum(0).expand(3, -1))
