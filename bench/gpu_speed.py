"""GPU speed of 2:4 against dense, end to end, at LLaMA shapes (one prepared run: at most 6 minutes on one H100).

Built on ``permsparse speed`` (:mod:`permsparse.deploy.speed`), fp16, random weights, every block linear
pruned to 2:4 by magnitude, three runs:

1. ``1b``: the LLaMA-3.2-1B shape, all 16 blocks, folded (every linear 2:4 in storage order): every
   candidate (eager, whole-model CUDA graph, regional ``torch.compile`` default / + CUDA graph /
   reduce-overhead, torch's semi-structured tensors made contiguous, torchao's ``sparsify_``, FP8 x 2:4)
   at 1 x 2048; the fastest exact one at 4 x 2048, 1 x 8192 and decode (batch 1);
2. ``8b``: the LLaMA-3.1-8B shape, 8 of its 32 blocks, folded: the candidates without the two plain
   compile modes (run 1 places them) at 1 x 8192; the fastest at 4 x 2048, 1 x 2048 and decode;
3. ``8b-permuted``: the same shape as a per-linear-binding export (residual readers and attention outputs
   stored permuted, runtime gathers): the fastest candidate of run 2 only, at 1 x 8192, 4 x 2048 and decode;
4. ``quantized``: one LLaMA-3.1-8B block's seven linears (q, k, v, o, gate, up, down), random 2:4 weights, each
   timed as the whole block replayed in one CUDA graph over enough copies of its weights to leave the L2 cache
   cold, against dense bf16 ``F.linear`` in the same run: int4 2:4 (:class:`permsparse.deploy.int4.Int4Linear24`,
   group 128: the Triton kernel at 1 and 16 tokens, dequantized 2:4 bf16 + cuSPARSELt at 2048) and FP8 x 2:4
   (:class:`permsparse.deploy.fp8.Fp8Linear24`) at 2048 and 8192 tokens; the int4 kernel's relative error
   against its dense dequantized weight is recorded beside.

The linear costs measured for the conversion policy are shared between the runs. Prints the elapsed time as
it goes, one table per run and the issue's targets against what was measured, and writes
bench/results/gpu_speed.json (after every run). Without a CUDA GPU it prints one line saying why and exits
with status 2, measuring nothing.

``--dry-run`` (on ``--device cpu`` too: the CPU rehearsal of the lent machine, ``make rehearse``) times
nothing: for each run it checks the run's options, makes the run's model at a tiny LLaMA shape (2 blocks of
width 64, 2:4, permuted where the run is) and checks it against its dense reference, runs an eager prefill
and a decode step with the static cache, and the Triton 2:4 kernel on one of its linears (under Triton's
interpreter on the CPU); it writes that to a temporary file unless ``--out`` names one, and exits 1 when a
run failed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = ROOT / "bench" / "results" / "gpu_speed.json"

EXPLORE_8B = ("eager", "graph", "compile+graph", "torch-semi", "torchao", "fp8")
# The dry run's model: every LLaMA shape's structure (grouped-query attention, untied head), tiny
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, max_position_embeddings=256)
QUANTIZED = "quantized"  # not a permsparse speed run: the linears of one block, quantized 2:4 against dense bf16
BLOCK_8B = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096), "gate": (14336, 4096),
            "up": (14336, 4096), "down": (4096, 14336)}
RUNS = {  # name -> SpeedConfig fields; "candidates" of 8b-permuted come from 8b's best
    "1b": dict(shape="llama-3.2-1b", prefill=((1, 2048), (4, 2048), (1, 8192))),
    "8b": dict(shape="llama-3.1-8b", layers=8, prefill=((1, 8192), (4, 2048), (1, 2048)), candidates=EXPLORE_8B),
    "8b-permuted": dict(shape="llama-3.1-8b", layers=8, permuted=True, prefill=((1, 8192), (4, 2048))),
}


def int4_linear(out: int, width: int, group: int, device: str, generator):
    """A random int4 2:4 linear as :class:`Int4Linear24` (codes, positions and group scales as a compressed checkpoint
    stores them) and its dense dequantized weight's dtype-free reference :meth:`Int4Linear24.dequantize`."""
    import torch

    from permsparse.deploy.format import compress_nm, pack_int4
    from permsparse.deploy.int4 import Int4Linear24
    from permsparse.sparsity.masks import nm_mask

    scores = torch.rand(out, width, generator=generator, device=device)
    codes = torch.randint(-8, 8, (out, width), generator=generator, device=device, dtype=torch.int8)
    codes = codes * nm_mask(scores, 2, 4).to(torch.int8)
    kept, positions = compress_nm(codes, 2, 4)
    scales = (torch.rand(out, width // group, generator=generator, device=device) * 0.01 + 1e-3).to(torch.bfloat16)
    return Int4Linear24(pack_int4(kept), positions, scales, group)


def quantized_rows(device: str, log, repeats: int = 5) -> dict:
    """The ``quantized`` run (see the module docstring): rows of (kind, tokens, ms, dense ms, speedup)."""
    import torch
    import torch.nn.functional as F

    from permsparse.deploy.costs import capture, event_ms
    from permsparse.deploy.fp8 import Fp8Linear24, fp8_problem
    from permsparse.sparsity.masks import nm_mask

    began = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(0)
    dense_bytes = sum(o * i * 2 for o, i in BLOCK_8B.values())

    def copies(bytes_per_block: int) -> int:  # blocks cycled per replay: more than any GPU's L2 cache (256 MB)
        return max(1, -(-256 * 2**20 // bytes_per_block))

    def timed(blocks: list[list], tokens: int) -> float:
        """Milliseconds per block: every copy's seven linears in one replayed graph (eager when not capturable)."""
        x = {width: torch.randn(tokens, width, generator=generator, device=device, dtype=torch.bfloat16)
             for width in {i for _, i in BLOCK_8B.values()}}
        calls = [lambda m=m, w=w: m(x[w]) for block in blocks for m, w in block]
        run = lambda: [call() for call in calls]  # noqa: E731
        try:
            replay = capture(run).replay
        except RuntimeError:
            replay = run
        return event_ms(replay, repeats) / len(blocks)

    def dense_block():
        made = []
        for out, width in BLOCK_8B.values():
            w = torch.randn(out, width, generator=generator, device=device, dtype=torch.bfloat16) * width ** -0.5
            made.append(((lambda x, w=w: F.linear(x, w)), width))
        return made

    rows, result = [], {"shape": "llama-3.1-8b block (7 linears)", "rows": rows, "notes": [],
                        "machine": {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}}
    dense = [dense_block() for _ in range(copies(dense_bytes))]
    dense_ms = {tokens: timed(dense, tokens) for tokens in (1, 16, 2048, 8192)}
    log(f"quantized: dense bf16 {', '.join(f'{t} tokens {ms:.3f} ms' for t, ms in dense_ms.items())}")
    del dense
    int4 = [[(int4_linear(o, i, 128, device, generator), i) for o, i in BLOCK_8B.values()]
            for _ in range(copies(dense_bytes // 5))]
    module = int4[0][4][0]  # gate: the kernel against its dense dequantized weight, bf16
    x = torch.randn(16, module.in_features, generator=generator, device=device, dtype=torch.bfloat16)
    reference = (x.float() @ module.dequantize(torch.bfloat16).float().T)
    result["int4_kernel_relative_error"] = ((module(x).float() - reference).abs().max() / reference.abs().max()).item()
    for tokens in (1, 16, 2048):
        ms = timed(int4, tokens)
        rows.append({"kind": "int4 2:4 g128", "tokens": tokens, "ms": ms, "dense_ms": dense_ms[tokens],
                     "speedup": dense_ms[tokens] / ms})
        log(f"quantized: int4 2:4 at {tokens} tokens {ms:.3f} ms, x{dense_ms[tokens] / ms:.2f} over dense bf16")
    result["int4_bytes_per_block"] = sum(t.nbytes for block in int4[:1] for m, _ in block
                                         for n, t in m.named_buffers() if n in ("codes", "meta", "scales"))
    del int4
    problem = fp8_problem()
    if problem:
        result["notes"].append(f"fp8: {problem}")
    else:
        fp8 = []
        for out, width in BLOCK_8B.values():
            linear = torch.nn.Linear(width, out, bias=False, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                linear.weight.mul_(nm_mask(linear.weight.abs().float(), 2, 4))
            fp8.append((Fp8Linear24.from_linear(linear), width))
            del linear
        for tokens in (2048, 8192):
            ms = timed([fp8], tokens)
            rows.append({"kind": "fp8 x 2:4", "tokens": tokens, "ms": ms, "dense_ms": dense_ms[tokens],
                         "speedup": dense_ms[tokens] / ms})
            log(f"quantized: fp8 x 2:4 at {tokens} tokens {ms:.3f} ms, x{dense_ms[tokens] / ms:.2f} over dense bf16")
    result["seconds"] = time.perf_counter() - began
    return result


def quantized_table(result: dict) -> str:
    lines = [f"quantized 2:4, {result['shape']}, ms per block", "| kind | tokens | ms | dense bf16 ms | speed-up |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['kind']} | {r['tokens']} | {r['ms']:.3f} | {r['dense_ms']:.3f} | {r['speedup']:.2f} |"
              for r in result["rows"]]
    return "\n".join(lines + [f"int4 kernel relative error: {result['int4_kernel_relative_error']:.2e}"] + result["notes"])


def run_fields(run: str, results: dict) -> dict:
    """The SpeedConfig fields of ``run``; 8b-permuted measures the best candidate of 8b (``graph`` without it)."""
    fields = dict(RUNS[run])
    if run == "8b-permuted":
        fields["candidates"] = ((results.get("8b") or {}).get("best") or "graph",)
    return fields


def main_dry_run(runs: list[str], device: str, out: Path) -> int:
    """:func:`dry_run` of each run; one line per run, the JSON, exit 1 when a run failed or disagreed."""
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel's module is imported, and as it runs
    from permsparse.deploy.speed import SpeedConfig

    began, results, failed = time.perf_counter(), {}, []
    for run in runs:
        try:
            results[run] = (dry_run_quantized(device) if run == QUANTIZED
                            else dry_run(SpeedConfig(**run_fields(run, results)), device))
            errors = results[run]["logit_error"]
            ok = all(error <= results[run]["tolerance"] for error in errors.values())
            line = ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + ("" if ok else " (over the tolerance)")
        except Exception as err:  # noqa: BLE001 - keep the other runs; say what failed
            import traceback

            results[run] = {"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            ok, line = False, results[run]["error"]
        failed += [] if ok else [run]
        print(f"| {run} | {'ok' if ok else 'FAILED'} | {line} |", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python3 bench/gpu_speed.py " + " ".join(sys.argv[1:]), "dry_run": True,
                               "device": device, "date": time.strftime("%Y-%m-%d"), "runs": results,
                               "targets": targets(results), "seconds": time.perf_counter() - began}, indent=1))
    print(f"wrote {out} ({time.perf_counter() - began:.0f} s)")
    if failed:
        print(f"dry run: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def targets(results: dict) -> list[str]:
    """The issue's targets, each with what was measured."""
    lines = []

    def rows(run: str) -> dict:
        result = results.get(run) or {}
        best = result.get("best")
        return {r["shape"]: r for r in result.get("rows", []) if r["candidate"] == best and "speedup" in r}

    def check(label: str, value: float | None, bound: float, at_least: bool = True) -> None:
        if value is None:
            lines.append(f"  {label}: not measured")
            return
        ok = value >= bound if at_least else value <= bound
        lines.append(f"  {label}: {value:.3f} ({'>=' if at_least else '<='} {bound}: {'met' if ok else 'MISSED'})")

    big, permuted, small = rows("8b"), rows("8b-permuted"), rows("1b")
    for shape in ("1x8192", "4x2048"):
        check(f"8B folded prefill {shape}", big.get(shape, {}).get("speedup"), 1.15)
        check(f"8B per-linear (permuted) prefill {shape}", permuted.get(shape, {}).get("speedup"), 1.1)
    prefill = [r["speedup"] for shape, r in small.items() if shape != "decode"]
    check("1B worst prefill shape", min(prefill) if prefill else None, 0.97)
    for run, found in (("1b", small), ("8b", big), ("8b-permuted", permuted)):
        decode = found.get("decode", {}).get("speedup")
        check(f"{run} decode batch 1", decode, 1.0)
        check(f"{run} decode batch 1, with the Triton decode kernel", decode, 1.3)
    quantized = {(r["kind"], r["tokens"]): r["speedup"] for r in (results.get(QUANTIZED) or {}).get("rows", [])}
    check("8B block int4 2:4 decode (1 token) / dense bf16", quantized.get(("int4 2:4 g128", 1)), 2.0)
    check("8B block fp8 x 2:4 prefill (8192 tokens) / dense bf16", quantized.get(("fp8 x 2:4", 8192)), 1.3)
    for run, result in results.items():
        if result and "bytes" in result and result["bytes"]["linear_deployed"]:
            held = result["bytes"]["linear_deployed"] / result["bytes"]["linear_dense"]
            check(f"{run} linear weight bytes / dense", held, 0.6, at_least=False)
            check(f"{run} logit error (2:4 path, relative)", result["logit_error"]["linear24"], result["tolerance"],
                  at_least=False)
    return lines


def dry_run(config, device: str) -> dict:
    """What a run's code does, at the tiny shape on ``device``, timing nothing: the model against its dense
    reference, an eager prefill and a decode step, and the Triton 2:4 kernel on one linear."""
    import torch

    from permsparse.deploy.convert import TOLERANCE
    from permsparse.deploy.format import compress
    from permsparse.deploy.speed import PROMPT, Runner, _single_sequences, random_model

    began = time.perf_counter()
    dtype = getattr(torch, config.dtype)
    with _single_sequences(), torch.no_grad():
        model, dense, names = random_model(TINY, 0, dtype, device, config.permuted, config.seed)
        generator = torch.Generator(device=device).manual_seed(config.seed + 2)
        ids = torch.randint(0, TINY["vocab_size"], (1, PROMPT), generator=generator, device=device)
        reference = dense(input_ids=ids, use_cache=False).logits.float()
        logits = model(input_ids=ids, use_cache=False).logits.float()
        error = ((logits - reference).abs().max() / reference.abs().max()).item()
        runner = Runner(model, "eager")
        batch, tokens = config.prefill[0]
        runner.prefill(batch, min(tokens, 64), generator)()
        runner.decode(config.decode_batch, 4, generator)()
        from permsparse.deploy.triton_decode import matmul24

        weight = model.get_submodule(names[0]).weight
        x = torch.randn(3, weight.shape[1], generator=generator, device=device).to(dtype)
        kernel = matmul24(x, *compress(weight)).float()
        kernel_error = ((kernel - (x @ weight.T).float()).abs().max() / (x @ weight.T).float().abs().max()).item()
    return {"config": {**asdict(config), "prefill": [f"{b}x{t}" for b, t in config.prefill]},
            "model": f"tiny LLaMA ({len(names)} 2:4 linears{', permuted' if config.permuted else ''})",
            "logit_error": {"model vs dense": error, "triton kernel": kernel_error},
            "tolerance": TOLERANCE[dtype], "seconds": time.perf_counter() - began}


def dry_run_quantized(device: str) -> dict:
    """The ``quantized`` run's code at a tiny shape, timing nothing: int4 2:4 linears at decode and prefill token
    counts against their dense dequantized weights (the Triton kernel under its interpreter on the CPU)."""
    import torch

    began = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(0)
    dtype = torch.float16
    errors = {}
    for tokens in (1, 16, 40):
        module = int4_linear(48, 256, 128, device, generator)
        x = torch.randn(tokens, 256, generator=generator, device=device).to(dtype)
        reference = x.float() @ module.dequantize(dtype).float().T
        with torch.no_grad():
            errors[f"int4 {tokens} tokens"] = ((module(x).float() - reference).abs().max() / reference.abs().max()).item()
    return {"model": "int4 2:4 linears 48x256, group 128", "logit_error": errors, "tolerance": 1e-2,
            "seconds": time.perf_counter() - began}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=",".join([QUANTIZED, *RUNS]),  # the short quantized run first
                        help=f"comma-separated, of {', '.join([*RUNS, QUANTIZED])}")
    parser.add_argument("--out", help="JSON file to write (default: bench/results/gpu_speed.json; a dry run: a "
                                      "temporary file)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="where it runs (cpu: only with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="every run's code path at a tiny shape, timing "
                                                               "nothing; exit 1 when a run failed")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.dry_run:
        parser.error("--device cpu runs only the dry run (--dry-run): speed needs a GPU")
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in RUNS and r != QUANTIZED]
    if unknown:
        print(f"bench/gpu_speed.py: unknown run {unknown[0]!r}; choose from {', '.join([*RUNS, QUANTIZED])}",
              file=sys.stderr)
        return 2
    if args.dry_run:
        return main_dry_run(runs, args.device, Path(args.out or Path(tempfile.gettempdir()) / "gpu_speed_dry_run.json"))
    args.out = args.out or str(RESULTS)
    from permsparse.deploy.speed import SpeedConfig, format_table, measure_speed, speed_problem

    problem = speed_problem()
    if problem:
        print(f"bench/gpu_speed.py: {problem}", file=sys.stderr)
        return 2
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f}s] {message}", flush=True)

    costs, results, tables = {}, {}, []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write() -> list[str]:
        summary = targets(results)
        out.write_text(json.dumps({"command": "python3 bench/gpu_speed.py " + " ".join(argv or sys.argv[1:]),
                                   "date": time.strftime("%Y-%m-%d"), "runs": results, "targets": summary,
                                   "seconds": time.perf_counter() - began}, indent=1))
        return summary

    for run in runs:
        fields = {} if run == QUANTIZED else run_fields(run, results)
        log(f"run {run}: {fields}")
        try:
            if run == QUANTIZED:
                results[run] = quantized_rows("cuda", log)
                tables.append(quantized_table(results[run]))
                write()
                continue
            results[run] = measure_speed(SpeedConfig(**fields), log=log, costs=costs)
        except Exception as err:  # noqa: BLE001 - keep the other runs; say what failed
            import traceback

            traceback.print_exc()
            results[run] = {"error": f"{type(err).__name__}: {err}"}
            tables.append(f"{run}: failed: {results[run]['error']}")
            write()
            continue
        tables.append(format_table(results[run]))
        log(f"run {run} done in {results[run]['seconds']:.0f} s")
        write()  # after each run: a run stopped from outside keeps the ones before
    summary = write()
    print()
    print("\n\n".join(tables))
    print("\ntargets (issue: 2:4 checkpoints that run faster than dense):")
    print("\n".join(summary))
    print(f"\nwrote {out} ({time.perf_counter() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
