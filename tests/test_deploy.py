"""The 2:4 inference path on the CPU: the compressed format, the Triton kernel (under Triton's interpreter), the
deployed linear, the conversion policy, the gathers folded into the norms, and ``permsparse speed``'s
refusal without a GPU. What only a GPU can tell (cuSPARSELt, timings) is measured by ``permsparse speed``."""
import importlib
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from permsparse import ExportConfig, PruneConfig, Search, export_checkpoint, load, prune
from permsparse.checkpoint.record import read_record
from permsparse.cli import main
from permsparse.deploy.convert import _set
from permsparse.deploy.format import compress, decompress
from permsparse.deploy.gathers import attach_gathers, fold_gathers, gathered_linears, gathering_modules, remove_gathers
from permsparse.deploy.linear import Linear24, weight_bytes
from permsparse.deploy.policy import Plan, choose, plan, read_costs, write_costs
from permsparse.deploy.speed import SpeedConfig, format_table, parse_prefill, random_model
from permsparse.sparsity.masks import is_nm

from .conftest import BUILDERS, CALIB, INPUT

ROOT = Path(__file__).resolve().parents[1]
TINY_LLAMA = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="about machines without a CUDA GPU")


def random_24(out: int, width: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A random 2:4 weight whose groups hold 0, 1 or 2 non-zeros, at every position."""
    gen = torch.Generator().manual_seed(seed)
    pairs = torch.tensor(list(itertools.combinations(range(4), 2)))
    keep = torch.zeros(out, width // 4, 4, dtype=torch.bool)
    keep.scatter_(-1, pairs[torch.randint(0, len(pairs), (out, width // 4), generator=gen)], True)
    weight = torch.randn(out, width, generator=gen) * keep.reshape(out, width)
    weight[torch.rand(out, width, generator=gen) < 0.2] = 0  # groups with one or no non-zero
    return weight.to(dtype)


@pytest.fixture(scope="module")
def kernel():
    """The Triton module, its kernel run by Triton's CPU interpreter while this module's tests run (skipped where
    Triton is absent)."""
    pytest.importorskip("triton")
    defined = sys.modules.get("permsparse.deploy.triton_decode")
    if defined is not None and not defined.INTERPRETED:
        pytest.skip("the Triton kernel was defined for the GPU earlier in this process")
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernel is defined and while it runs
    try:
        yield importlib.import_module("permsparse.deploy.triton_decode")
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before


# --- the compressed format -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compress_round_trip_is_exact(dtype):
    weight = random_24(24, 64, dtype)
    weight[3, 8:12] = torch.tensor([0.0, -0.0, 0.0, 0.0], dtype=dtype)
    values, meta = compress(weight)
    assert values.shape == (24, 32) and values.dtype == dtype and meta.shape == (24, 8) and meta.dtype == torch.uint8
    assert torch.equal(decompress(values, meta), weight)
    if dtype != torch.float32:  # what a decode step reads: 56.25% of the dense bytes
        assert (values.nbytes + meta.nbytes) / weight.nbytes == pytest.approx(0.5625)


def test_compress_refuses_what_is_not_24_in_one_line():
    weight = random_24(8, 32)
    weight[2, 8:12] = torch.tensor([1.0, 2.0, 3.0, 0.0])
    weight[5, 0:4] = 1.0
    first = r"not 2:4 in storage order: 2 groups .* \(first: row 2, columns 8\.\.11 holds 3\)"
    with pytest.raises(ValueError, match=first):
        compress(weight)
    with pytest.raises(ValueError, match="in_features 12 is not a multiple of 8"):
        compress(random_24(4, 12))
    with pytest.raises(ValueError, match="2-D"):
        compress(torch.zeros(2, 4, 8))
    values, meta = compress(random_24(4, 16))
    with pytest.raises(ValueError, match="does not match values"):
        decompress(values, meta[:, :1])


# --- the Triton kernel, on the CPU through Triton's interpreter ---------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tokens", [1, 3, 8, 16])
def test_triton_kernel_equals_the_dense_product(kernel, dtype, tokens):
    weight = random_24(48, 96, dtype, seed=tokens)
    values, meta = compress(weight)
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 96, generator=gen).to(dtype)
    bias = torch.randn(48, generator=gen).to(dtype)
    perm = torch.randperm(96, generator=gen)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    for b, p in [(None, None), (bias, None), (bias, perm)]:
        got = kernel.matmul24(x, values, meta, b, p)
        xp = x if p is None else x[:, p]
        expected = xp.float() @ weight.float().T + (0 if b is None else b.float())
        assert got.shape == (tokens, 48) and got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got.float(), expected, **tolerance)


def test_triton_kernel_tiles_more_tokens_and_ragged_widths(kernel):
    weight = random_24(40, 72)  # neither a multiple of the output nor of the input tile
    values, meta = compress(weight)
    x = torch.randn(37, 72, generator=torch.Generator().manual_seed(5))
    assert kernel.blocks(37, 40)[0] > 16  # the square tiles above decode sizes
    torch.testing.assert_close(kernel.matmul24(x, values, meta), x @ weight.T, atol=1e-5, rtol=1e-5)


def int4_24(out: int, width: int, group: int, seed: int = 0, exact: bool = False):
    """A 4-bit 2:4 weight as a compressed checkpoint stores it (``(codes, positions, scales, order)``) and its dense
    dequantization in the linear's own input order. ``exact``: scales are powers of two, so that with small integer
    inputs every product and sum is exact in float32 and any summation order gives the same bits."""
    from permsparse.checkpoint.compressed import store_linear
    from permsparse.quant import QuantizedWeight
    from permsparse.quant.rtn import rtn

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(width, generator=gen)
    stored = random_24(out, width, seed=seed)  # 2:4 in storage order, groups with 0, 1 or 2 non-zeros
    weight = torch.empty_like(stored)
    weight[:, order] = stored
    if exact:
        codes = torch.randint(-8, 8, (out, width), generator=gen, dtype=torch.int8) * (stored != 0)
        scales = 2.0 ** -torch.randint(0, 4, (out, width // group), generator=gen).float()
        quantized = QuantizedWeight("int4", codes, scales, group, order)
    else:
        quantized = rtn(weight, "int4", group, order)
    record = store_linear(weight, nm=(2, 4), order=order, quantized=quantized, dtype=torch.bfloat16)
    assert record.spec.quant == "int4" and record.problem() == ""
    return record, quantized


@pytest.mark.parametrize("tokens", [1, 5, 16])
def test_triton_int4_kernel_is_exact_against_the_dequantized_weight(kernel, tokens):
    record, quantized = int4_24(40, 256, 32, seed=tokens, exact=True)  # 40 rows: a ragged output tile
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randint(-4, 5, (tokens, 256), generator=gen).float()
    bias = torch.randint(-4, 5, (40,), generator=gen).float()
    dense = quantized.weight(torch.float32)
    order = record.input_order.long()
    got = kernel.matmul24_int4(x, record.values, record.positions, record._scales(), 32, bias, order)
    assert got.shape == (tokens, 40) and got.is_contiguous()
    assert torch.equal(got, x @ dense.T + bias)  # every product and sum exact: the same bits in any order
    assert torch.equal(record.expand(torch.float32), dense)  # what a CPU load expands to


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [8, 64])
def test_triton_int4_kernel_equals_the_dense_product_of_rtn_codes(kernel, dtype, group):
    record, quantized = int4_24(48, 128, group, seed=group)
    gen = torch.Generator().manual_seed(group)
    x = torch.randn(3, 128, generator=gen).to(dtype)
    scales = record._scales()  # bfloat16: every scale is exact there, so any float dtype of it is the same scale
    for b, p in [(None, None), (torch.randn(48, generator=gen).to(dtype), record.input_order.long())]:
        got = kernel.matmul24_int4(x, record.values, record.positions, scales, group, b, p)
        xp = x if p is None else x[:, p]
        expected = xp.float() @ quantized.dequantize(dtype).float().T + (0 if b is None else b.float())
        assert got.dtype == dtype
        tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(got.float(), expected, **tolerance)


def test_triton_int4_kernel_refuses_a_group_it_cannot_read(kernel):
    record, _ = int4_24(16, 64, 8)
    with pytest.raises(ValueError, match="quantization group 6 is not a multiple of 4"):
        kernel.matmul24_int4(torch.zeros(1, 64), record.values, record.positions, record._scales(), 6)


# --- the deployed linear ------------------------------------------------------------------------------------------

def test_linear24_triton_storage_runs_a_permuted_model(kernel):
    model, dense, names = random_model(TINY_LLAMA, dtype=torch.float32, device="cpu", permuted=True)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = dense(input_ids=ids).logits
        for name in names:
            _set(model, name, Linear24.from_linear(model.get_submodule(name), "triton"))
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    q = model.get_submodule(names[0])
    assert q.storage == "triton" and q.permsparse_gather is not None and "input gather" in repr(q)
    assert weight_bytes(q) < 0.6 * weight_bytes(dense.get_submodule(names[0]))
    assert "permsparse" not in json.dumps(list(model.state_dict()))  # compressed tensors are not saved


def test_linear24_refuses_a_wrong_storage_or_weight():
    with pytest.raises(ValueError, match="unknown 2:4 storage"):
        Linear24(8, 8, "cutlass")
    with pytest.raises(ValueError, match="the triton storage holds values, meta; missing meta"):
        Linear24(8, 8, "triton", values=torch.zeros(8, 4))
    linear = torch.nn.Linear(16, 4)
    with pytest.raises(ValueError, match="not 2:4 in storage order"):
        Linear24.from_linear(linear, "triton")


# --- the conversion policy ----------------------------------------------------------------------------------------

def table(**kernels) -> dict:
    """Costs of one 64x32 float16 linear: kernel -> {tokens: ms}."""
    return {(64, 32, t, "float16", k): ms for k, by_tokens in kernels.items() for t, ms in by_tokens.items()}


ALL = {"cusparselt": "", "triton": "", "cusparselt+triton": ""}


def test_a_slower_or_equal_24_kernel_stays_dense():
    costs = table(dense={2048: 1.0}, cusparselt={2048: 1.2}, triton={2048: 3.0})
    choice = choose(64, 32, "float16", {2048: 1}, costs, ALL)
    assert choice.storage == "dense" and "2:4 is not faster" in choice.reason and "cusparselt 1.2 ms" in choice.reason
    tie = choose(64, 32, "float16", {2048: 1}, table(dense={2048: 1.0}, cusparselt={2048: 1.0}), {"cusparselt": ""})
    assert tie.storage == "dense"


def test_the_cheapest_storage_for_the_workload_wins():
    costs = table(dense={1: 0.02, 2048: 1.0}, cusparselt={1: 0.06, 2048: 0.8}, triton={1: 0.012, 2048: 1.5})
    prefill_only = choose(64, 32, "float16", {2048: 1}, costs, ALL)
    assert prefill_only.storage == "cusparselt" and prefill_only.reason.startswith("1.25x faster")
    both = choose(64, 32, "float16", {2048: 1, 1: 128}, costs, ALL)
    assert both.storage == "cusparselt+triton" and both.decode_max == 1 and both.ms == {1: 0.012, 2048: 0.8}
    without_sharing = choose(64, 32, "float16", {2048: 1, 1: 128}, costs,
                             {**ALL, "cusparselt+triton": "values not row by row"})
    assert without_sharing.storage == "triton"  # decode dominates: 128 x 0.008 ms saved against 0.5 ms lost
    decode_loses = choose(64, 32, "float16", {2048: 1, 1: 128}, costs, {"cusparselt": ""})
    assert decode_loses.storage == "dense" and "cusparselt" in decode_loses.reason
    equal = table(dense={1: 1.0, 8: 1.0}, cusparselt={1: 0.5, 8: 0.5}, triton={1: 0.5, 8: 0.5})
    assert choose(64, 32, "float16", {1: 1, 8: 1}, equal, ALL).storage == "cusparselt"  # fewer bytes on a tie


def test_missing_costs_are_measured_once_or_keep_the_linear_dense():
    calls = []

    def measure(out, width, tokens, dtype, kernel):
        calls.append((out, width, tokens, kernel))
        return {"dense": 1.0, "cusparselt": 0.5}.get(kernel)  # no Triton kernel here

    costs = {}
    shapes = {"a": (64, 32), "b": (64, 32), "c": (128, 32)}
    result = plan(shapes, "float16", {2048: 1}, costs, lambda o, i: ALL, measure)
    assert isinstance(result, Plan) and result.converted == ["a", "b", "c"]
    assert sorted(calls) == sorted((o, 32, 2048, k) for o in (64, 128) for k in ("dense", "cusparselt", "triton"))
    assert (64, 32, 2048, "float16", "cusparselt") in costs and result.predicted_speedup() == pytest.approx(2.0)
    assert result.speedup_by_tokens() == {2048: pytest.approx(2.0)}
    unmeasured = choose(64, 32, "float16", {1: 1}, {}, ALL)
    assert unmeasured.storage == "dense" and unmeasured.reason == "no cost known for dense at 1 tokens"
    partial = choose(64, 32, "float16", {1: 1}, table(dense={1: 1.0}, triton={1: 0.5}),
                     {"cusparselt": "", "triton": ""})
    assert partial.storage == "triton" and partial.decode_max == 0
    unavailable = choose(64, 32, "float16", {1: 1}, table(dense={1: 1.0}), {"cusparselt": "no cuSPARSELt"})
    assert unavailable.storage == "dense" and "cusparselt: no cuSPARSELt" in unavailable.reason
    with pytest.raises(ValueError, match="positive call counts"):
        choose(64, 32, "float16", {1: 0}, {}, ALL)


def test_cost_tables_round_trip_through_json(tmp_path):
    costs = table(dense={1: 0.02, 2048: 1.0}, cusparselt={2048: 0.8})
    path = write_costs(costs, tmp_path / "costs.json", machine={"gpu": "test"})
    assert read_costs(path) == costs
    (tmp_path / "bad.json").write_text(json.dumps({"costs": [{"out": 1, "in": 2, "tokens": 3, "dtype": "float16",
                                                             "kernel": "cutlass", "ms": 1.0}]}))
    with pytest.raises(ValueError, match="unknown kernel 'cutlass'"):
        read_costs(tmp_path / "bad.json")
    (tmp_path / "none.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no cost table"):
        read_costs(tmp_path / "none.json")


def test_deploy_converts_what_the_policy_chooses_and_checks_it(kernel, monkeypatch):
    """The conversion on the CPU with the GPU checks stubbed: the Triton storage runs through the interpreter,
    cuSPARSELt (absent here) fails its conversion and keeps its linears dense."""
    from permsparse.deploy import convert, cusparselt

    model, dense, names = random_model(TINY_LLAMA, dtype=torch.float16, device="cpu", permuted=True)
    eligible = convert._eligible
    monkeypatch.setattr(convert, "gpu_problem", lambda device=None: "")
    monkeypatch.setattr(convert, "_eligible", lambda m: "" if eligible(m).startswith("weight on cpu") else eligible(m))
    monkeypatch.setattr(convert, "storages_here", lambda dtype, device, backend="auto": dict.fromkeys(
        ("cusparselt", "triton", "cusparselt+triton"), ""))
    monkeypatch.setattr(cusparselt, "cusparselt_available", lambda: True)
    costs = {}
    for (out, width), kernels in {(64, 64): {"triton": 0.5}, (32, 64): {"triton": 0.5}, (128, 64): {"triton": 2.0},
                                  (64, 128): {"cusparselt": 0.5}}.items():
        for tokens in (1, 16):
            for kernel_name in ("dense", "cusparselt", "triton"):
                costs[out, width, tokens, "float16", kernel_name] = kernels.get(kernel_name, 1.0)
    info = convert.deploy(model, names, workload={16: 1, 1: 8}, costs=costs)
    storages = {name.rpartition(".")[2]: storage for name, storage in info["storages"].items()}
    assert storages == dict.fromkeys(["q_proj", "k_proj", "v_proj", "o_proj"], "triton")
    reasons = {name.rpartition(".")[2]: why for name, why in info["not_converted"].items()}
    assert reasons["gate_proj"].startswith("2:4 is not faster") and reasons["up_proj"] == reasons["gate_proj"]
    assert reasons["down_proj"].startswith("cusparselt: conversion failed")  # no cuSPARSELt on the CPU
    assert info["predicted_speedup"] == pytest.approx((14 * 9) / (8 * 4.5 + 6 * 9))
    converted, kept = 64 * 64 * 2 + 32 * 64 * 2, 128 * 64 * 3  # q, o, k, v compressed; gate, up, down dense
    assert info["bytes"]["ratio"] == pytest.approx((converted * 0.5625 + kept) / (converted + kept))
    assert info["choices"]["64x64"] == {"storage": "triton", "reason": "2.00x faster than dense (9 ms -> 4.5 ms)",
                                        "triton_up_to_tokens": "all"}
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits.float(), dense(input_ids=ids).logits.float(),
                                   atol=2e-2, rtol=1e-2)


# --- gathers folded into the norms --------------------------------------------------------------------------------

class CountGathers(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.index_select.default
        return func(*args, **(kwargs or {}))


def gathers_run(model) -> int:
    with torch.no_grad(), CountGathers() as counter:
        model(INPUT)
    return counter.count


@pytest.mark.parametrize("family, binding", [(f, b) for f in sorted(BUILDERS) for b in ("shared", "per-linear")])
def test_gathers_fold_into_the_norms_exactly(family, binding, tmp_path):
    model = BUILDERS[family]()
    config = PruneConfig(permutation=Search("ria"), binding=binding)
    report = prune(model, None, config, windows=CALIB[:4], progress=False)
    with torch.no_grad():
        expected = model(INPUT).logits
    out = export_checkpoint(model, None, tmp_path / "g", config, report, export=ExportConfig("folded", "gather"))
    deployed = load(out)
    folds = deployed.permsparse_deploy["gather_folds"]
    with torch.no_grad():
        torch.testing.assert_close(deployed(INPUT).logits, expected, atol=1e-5, rtol=1e-4)
    gathered = deployed.permsparse_deploy["gathers"]
    moved = [name for names in folds["norms"].values() for name in names]
    assert sorted(moved + list(folds["kept"])) == sorted(gathered)
    assert gathers_run(deployed) == len(folds["norms"]) + len(folds["kept"])
    unfolded = load(out)
    remove_gathers(unfolded)
    attach_gathers(unfolded, {name: entry.perm for name, entry in read_record(out).layouts.items() if name in gathered})
    assert gathers_run(unfolded) == len(gathered)
    if binding == "shared" and family in ("llama", "opt"):  # q/k/v (and gate/up) read one norm: fewer gathers
        assert len(folds["norms"]) == 4 and not folds["kept"] and gathers_run(deployed) < len(gathered)
    if binding == "per-linear" and family == "llama":
        assert not folds["norms"] and all("different permutations" in why or "not a block norm" in why
                                          for why in folds["kept"].values())
    assert "permsparse_gather" not in json.dumps(list(deployed.state_dict()))
    assert sorted(remove_gathers(deployed)) == sorted(list(folds["norms"]) + list(folds["kept"]))


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_folding_gathers_leaves_the_structure_discovered_for_the_architecture(family, tmp_path, monkeypatch):
    """Discovery's result is kept for every model of an architecture: the fold's discovery must see the model
    without its gathers, or a plain model of the same shape would later get a structure whose residual stream
    cannot be permuted."""
    from permsparse.discover import adapters
    from permsparse.discover import discover

    model = BUILDERS[family]()
    config = PruneConfig(permutation=Search("ria"), binding="shared")
    report = prune(model, None, config, windows=CALIB[:4], progress=False)
    out = export_checkpoint(model, None, tmp_path / "g", config, report, export=ExportConfig("folded", "gather"))
    gathered = BUILDERS[family]()  # the architecture of a plain model, with the export's gathers
    attach_gathers(gathered, {name: entry.perm for name, entry in read_record(out).layouts.items()
                              if entry.layout == "gather"})
    monkeypatch.setattr(adapters, "_DISCOVERED", {})  # the next discovery is the gathered model's
    fold_gathers(gathered)
    assert adapters.adapter_for(BUILDERS[family]()) == discover(BUILDERS[family]())


def test_a_norm_also_read_ungathered_keeps_its_readers_gathers():
    model, dense, names = random_model(TINY_LLAMA, dtype=torch.float32, device="cpu")
    gen = torch.Generator().manual_seed(0)
    q, k = names[0], names[1]
    perm = torch.randperm(64, generator=gen)
    for name in (q, k):  # q and k stored permuted, v reads the same norm ungathered
        linear = model.get_submodule(name)
        with torch.no_grad():
            linear.weight.copy_(linear.weight[:, perm])
    attach_gathers(model, {q: perm, k: perm})
    folds = fold_gathers(model)
    assert not folds.norms and "reads it ungathered" in folds.kept[q]
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT).logits, dense(INPUT).logits, atol=1e-5, rtol=1e-4)
    assert sorted(gathered_linears(model)) == sorted([q, k]) and sorted(gathering_modules(model)) == sorted([q, k])


# --- permsparse speed ---------------------------------------------------------------------------------------------

def test_speed_model_is_24_and_equals_its_dense_reference():
    model, dense, names = random_model(TINY_LLAMA, dtype=torch.float32, device="cpu", permuted=True)
    assert len(names) == 14 and all(is_nm(model.get_submodule(n).weight, 2, 4) for n in names)
    assert sorted(gathered_linears(model)) == sorted(n for n in names if not n.endswith(("down_proj",)))
    assert not any(is_nm(dense.get_submodule(n).weight, 2, 4) for n in gathered_linears(model))
    with torch.no_grad():
        torch.testing.assert_close(model(INPUT).logits, dense(INPUT).logits, atol=1e-5, rtol=1e-4)
    folded, _, _ = random_model(TINY_LLAMA, dtype=torch.float32, device="cpu")
    assert not gathering_modules(folded)


def test_speed_options_are_checked():
    assert parse_prefill("1x2048, 4X512") == ((1, 2048), (4, 512))
    with pytest.raises(ValueError, match="not BATCHxTOKENS"):
        parse_prefill("2048")
    for bad, message in [(dict(shape="gpt-5"), "unknown shape"), (dict(dtype="float32"), "float16 or bfloat16"),
                         (dict(candidates=("eager", "magic")), "unknown candidate 'magic'"),
                         (dict(checkpoint="x", permuted=True), "a checkpoint is measured as it is")]:
        with pytest.raises(ValueError, match=message):
            SpeedConfig(**bad)


def test_speed_table_has_one_row_per_measurement():
    result = {
        "model": "llama-3.1-8b (8 of 32 blocks)", "config": {"dtype": "float16", "permuted": True},
        "machine": {"gpu": "H100"}, "linears": 56, "bytes": {"linear_dense": 1000, "linear_deployed": 570},
        "deploy": {"converted": ["a"] * 56, "storages": {"a": "cusparselt+triton"}, "predicted_speedup": 1.2},
        "logit_error": {"linear24": 1e-3, "fp8": 0.03}, "tolerance": 1e-2, "best": "graph",
        "rows": [{"candidate": "graph", "regime": "graph", "shape": "1x8192", "dense_ms": 90.8, "sparse_ms": 75.0,
                  "speedup": 1.21},
                 {"candidate": "torchao", "shape": "1x8192", "error": "ModuleNotFoundError: No module named 'torchao'"},
                 {"candidate": "graph", "regime": "graph", "shape": "decode", "dense_ms": 5.0, "sparse_ms": 4.0,
                  "speedup": 1.25}],
    }
    text = format_table(result).splitlines()
    assert len(text) == 5 and "56/56 linears 2:4 (cusparselt+triton)" in text[0] and "0.570 of dense bytes" in text[0]
    assert "1.210" in text[2] and "No module named 'torchao'" in text[3] and text[4].endswith("per token")


@NO_GPU
def test_speed_refuses_without_a_gpu_in_one_line(capsys):
    assert main(["speed", "--shape", "llama-3.1-8b", "--layers", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a CUDA GPU" in err[0] and "nothing was measured" in err[0]


@NO_GPU
def test_gpu_speed_bench_refuses_without_a_gpu_in_one_line():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_speed.py")], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1 and "CUDA GPU" in run.stderr
    assert run.stdout == ""
