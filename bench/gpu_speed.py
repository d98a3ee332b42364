"""GPU speed of 2:4 semi-structured sparsity, with and without the runtime input gather (one prepared run).

Two parts, fp16, on one CUDA GPU (compute capability >= 8.0):

1. Single linears at LLaMA-7B shapes (out x in: 4096x4096, 11008x4096, 4096x11008) for 1, 16 and 2048
   tokens: dense ``F.linear`` vs the 2:4 weight as a ``torch.sparse`` semi-structured tensor (each available
   backend: cuSPARSELt, CUTLASS) vs 2:4 plus the input gather ``x[:, p]`` that an unfolded permutation costs
   at run time (``permsparse.checkpoint.load``'s gather), and the gather alone. Each sparse result is checked against
   the dense product of the same weights.
2. A whole model: SmolLM2-135M (``permsparse.load_model('smollm2-135m')``) when available, else a random
   LLaMA of ~1.1B parameters (TinyLlama's shape). Every block linear is pruned to 2:4 by magnitude; the
   residual readers (q/k/v, gate/up) are 2:4 only through a random permutation, as after a shared-binding
   export without a global hidden permutation. Rows: dense (masked layout), dense + gathers (the readers
   stored permuted), 2:4 + gathers (the ``fallback="gather"`` deployment, same function as dense), and
   2:4 everywhere with no gather (the speed of a fully folded model). Prefill of 1 x 512 and 1 x 2048
   tokens (last-position logits only) and greedy decode (per token, after a 128-token prompt, KV cache).

Times are medians of CUDA-event timings of back-to-back launches after warm-up. Prints a table and writes
bench/results/gpu_speed.json. Without a CUDA GPU it prints why and exits with status 2, measuring nothing.
Budget: well under 5 minutes on an H200.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without installing
os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = ROOT / "bench" / "results" / "gpu_speed.json"

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out_features, in_features)
TOKENS = [1, 16, 2048, 8192]
DEVICE = "cuda"
TINYLLAMA = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=4096)


def cuda_problem() -> str:
    """Why this machine cannot run the benchmark, or ""."""
    import torch

    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        return (f"bench/gpu_speed.py needs a CUDA GPU (2:4 semi-structured kernels run on NVIDIA GPUs of compute "
                f"capability >= 8.0); torch {torch.__version__} ({build}) sees none. Nothing was measured.")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"bench/gpu_speed.py needs compute capability >= 8.0 for 2:4 kernels; this GPU has {major}.{minor}"
    return ""


def cuda_ms(fn, min_ms: float = 40.0, repeats: int = 5) -> float:
    """Median milliseconds per call of ``fn``, timed with CUDA events over back-to-back calls."""
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def run(n: int) -> float:
        start.record()
        for _ in range(n):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    n = 1
    while (ms := run(n)) < min_ms and n < 4096:
        n = min(4096, max(2 * n, int(n * min_ms / max(ms, 1e-3)) + 1))
    return statistics.median(run(n) / n for _ in range(repeats))


def graph_ms(fn) -> float | None:
    """Like :func:`cuda_ms` for ``fn`` captured once in a CUDA graph and replayed: the device time without
    the host's per-call work (None when ``fn`` cannot be captured). Tells kernel time from launch overhead."""
    import torch

    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception:  # noqa: BLE001 - not capturable: report None
        return None
    return cuda_ms(graph.replay)


def backends() -> list[str]:
    import torch

    found = ["cutlass"]
    if getattr(getattr(torch.backends, "cusparselt", None), "is_available", lambda: False)():
        found.insert(0, "cusparselt")
    return found


def random_24(rows: int, cols: int, generator, device: str | None = None):
    """A random fp16 weight pruned to 2:4 (by magnitude) in storage order."""
    import torch

    from permsparse.masks import nm_mask

    weight = torch.randn(rows, cols, generator=generator, device=device or DEVICE, dtype=torch.float16) * cols ** -0.5
    return weight * nm_mask(weight.abs().float(), 2, 4)


def bench_linears(log) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from permsparse.checkpoint.load import semi_structured_class

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    rows = []
    for out_f, in_f in SHAPES:
        stored = random_24(out_f, in_f, gen)  # 2:4 in storage order
        perm = torch.randperm(in_f, generator=gen, device=DEVICE)
        original = stored[:, torch.argsort(perm)]  # the masked layout: 2:4 only through perm
        sparse = {}
        for name in backends():
            try:
                sparse[name] = semi_structured_class(name).from_dense(stored.contiguous())
            except Exception as err:  # noqa: BLE001 - report any backend failure and go on
                log(f"  {name} cannot convert {out_f}x{in_f}: {type(err).__name__}: {str(err).splitlines()[0]}")
        for tokens in TOKENS:
            x = torch.randn(tokens, in_f, generator=gen, device=DEVICE, dtype=torch.float16)
            row = {"shape": f"{out_f}x{in_f}", "tokens": tokens}
            row["dense_ms"] = cuda_ms(lambda: F.linear(x, original))
            row["dense_graph_ms"] = graph_ms(lambda: F.linear(x, original))
            row["gather_only_ms"] = cuda_ms(lambda: x.index_select(-1, perm))
            reference = F.linear(x, original).float()
            scale = reference.abs().max().item()
            for name, weight in sparse.items():
                try:
                    got = F.linear(x.index_select(-1, perm), weight).float()
                    row[f"{name}_err"] = (got - reference).abs().max().item() / scale
                    row[f"{name}_ms"] = cuda_ms(lambda: F.linear(x, weight))
                    row[f"{name}_gather_ms"] = cuda_ms(lambda: F.linear(x.index_select(-1, perm), weight))
                    row[f"{name}_graph_ms"] = graph_ms(lambda: F.linear(x, weight))
                    row[f"{name}_speedup"] = row["dense_ms"] / row[f"{name}_ms"]
                    row[f"{name}_gather_speedup"] = row["dense_ms"] / row[f"{name}_gather_ms"]
                except Exception as err:  # noqa: BLE001
                    row[f"{name}_error"] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            rows.append(row)
            log("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return rows


def build_model(choice: str, log):
    """(model on the GPU in fp16, its name)."""
    import torch

    if choice in ("auto", "smollm2"):
        try:
            from permsparse import load_model

            model, _ = load_model("smollm2-135m", torch.float16)
            return model.to(DEVICE).eval(), "smollm2-135m"
        except Exception as err:  # noqa: BLE001 - fall back to a random model
            if choice == "smollm2":
                raise
            log(f"SmolLM2-135M not available ({type(err).__name__}: {err}); using a random ~1.1B LLaMA")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**TINYLLAMA)
    with torch.device(DEVICE):
        model = LlamaForCausalLM(config).to(torch.float16)
    return model.eval(), "random-llama-1.1b"


def prepare_model(model) -> tuple[dict, list[str]]:
    """Prune every block linear to 2:4 in storage; readers get a permutation their weight is 2:4 through.

    The model is changed into the masked layout (dense reference). Returns (reader permutations, all names).
    """
    import torch

    from permsparse.adapters import adapter_for, linear_weight
    from permsparse.masks import nm_mask

    adapter = adapter_for(model)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    perms, names, shared = {}, [], {}
    with torch.no_grad():
        for i in range(len(adapter.blocks(model))):
            for group in adapter.input_groups:
                for rel in group:
                    name = f"{adapter.blocks_path}.{i}.{rel}"
                    weight = linear_weight(model.get_submodule(name))
                    weight.mul_(nm_mask(weight.abs().float(), 2, 4))
                    names.append(name)
                    if rel in adapter.residual_readers:
                        if (i, group) not in shared:  # shared binding: one permutation per input
                            shared[i, group] = torch.randperm(weight.shape[1], generator=gen, device=DEVICE)
                        perms[name] = shared[i, group]
                        weight.copy_(weight[:, torch.argsort(perms[name])])  # 2:4 only through the permutation
    return perms, names


def bench_model(choice: str, log) -> dict:
    import torch

    from permsparse.adapters import linear_weight
    from permsparse.checkpoint.load import attach_gathers, convert_semi_structured, remove_gathers

    model, label = build_model(choice, log)
    perms, names = prepare_model(model)
    params = sum(p.numel() for p in model.parameters())
    log(f"model {label}: {params / 1e9:.2f}B parameters, {len(names)} 2:4 linears, {len(perms)} with gathers")

    def store_permuted(m):
        with torch.no_grad():
            for name, perm in perms.items():
                weight = linear_weight(m.get_submodule(name))
                weight.copy_(weight[:, perm])
        attach_gathers(m, perms)
        return m

    dense = model
    dense_gather = store_permuted(copy.deepcopy(model))
    sparse_gather = store_permuted(copy.deepcopy(model))
    info_gather = convert_semi_structured(sparse_gather, names)
    sparse = store_permuted(copy.deepcopy(model))
    remove_gathers(sparse)
    info_sparse = convert_semi_structured(sparse, names)
    variants = {"dense": dense, "dense+gather": dense_gather, "2:4+gather": sparse_gather, "2:4 (folded)": sparse}

    vocab = model.config.vocab_size
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    check = torch.randint(0, vocab, (1, 64), generator=gen, device=DEVICE)
    with torch.inference_mode():
        ref = dense(check).logits.float()
        errors = {k: ((m(check).logits.float() - ref).abs().max() / ref.abs().max()).item()
                  for k, m in variants.items() if k != "2:4 (folded)"}  # the folded row is another function
    results = {"model": label, "parameters": params, "linears": len(names), "gathers": len(perms),
               "converted": {"2:4+gather": len(info_gather["converted"]), "2:4 (folded)": len(info_sparse["converted"])},
               "not_converted": dict(list(info_gather["not_converted"].items())[:5]),
               "backend": info_gather["backend"], "logit_rel_err_vs_dense": errors, "rows": []}
    prompt = torch.randint(0, vocab, (1, 128), generator=gen, device=DEVICE)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    # transformers 5.2x names the KV cache ``cache`` (argument and output); earlier ``past_key_values``
    cache_arg = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"

    def cache_of(out):
        cache = getattr(out, "cache", None)
        return cache if cache is not None else out.past_key_values

    def decode_ms(m, steps: int = 32) -> float:
        out = m(prompt, use_cache=True, logits_to_keep=1)
        past, token = cache_of(out), out.logits[:, -1:].argmax(-1)
        start.record()
        for _ in range(steps):
            out = m(token, use_cache=True, **{cache_arg: past})
            past, token = cache_of(out), out.logits[:, -1:].argmax(-1)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / steps

    with torch.inference_mode():
        for key, m in variants.items():
            row = {"variant": key}
            for length in (512, 2048):
                ids = torch.randint(0, vocab, (1, length), generator=gen, device=DEVICE)
                row[f"prefill_{length}_ms"] = cuda_ms(lambda: m(ids, use_cache=False, logits_to_keep=1), min_ms=100,
                                                      repeats=3)
            decode_ms(m, 4)  # warm-up
            row["decode_ms_per_token"] = statistics.median(decode_ms(m) for _ in range(3))
            results["rows"].append(row)
            log("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    base = results["rows"][0]
    for row in results["rows"]:
        for k in ("prefill_512_ms", "prefill_2048_ms", "decode_ms_per_token"):
            row[k.replace("_ms", "") + "_speedup"] = base[k] / row[k]
    return results


def print_tables(linears: list[dict], model: dict | None) -> None:
    names = backends()
    head = f"{'shape':>11} {'tok':>5} {'dense ms':>9} {'graph ms':>9} {'gather ms':>9}"
    for name in names:
        head += f" {name + ' ms':>14} {'graph ms':>9} {'x':>5} {'+gather ms':>10} {'x':>5} {'rel err':>8}"
    print(head)
    for r in linears:
        graph = "-" if r["dense_graph_ms"] is None else f"{r['dense_graph_ms']:.4f}"
        line = f"{r['shape']:>11} {r['tokens']:>5} {r['dense_ms']:>9.4f} {graph:>9} {r['gather_only_ms']:>9.4f}"
        for name in names:
            if f"{name}_ms" in r:
                graph = "-" if r[f"{name}_graph_ms"] is None else f"{r[f'{name}_graph_ms']:.4f}"
                line += (f" {r[f'{name}_ms']:>14.4f} {graph:>9} {r[f'{name}_speedup']:>5.2f} {r[f'{name}_gather_ms']:>10.4f}"
                         f" {r[f'{name}_gather_speedup']:>5.2f} {r[f'{name}_err']:>8.1e}")
            else:
                line += f" {'n/a: ' + r.get(f'{name}_error', 'no conversion')[:50]:>54}"
        print(line)
    if model and "error" in model:
        print(f"\nmodel part failed: {model['error']}")
    elif model:
        print(f"\n{model['model']} ({model['parameters'] / 1e9:.2f}B params, backend {model['backend']}, "
              f"{model['converted']} linears converted); logit error vs dense: {model['logit_rel_err_vs_dense']}")
        print(f"{'variant':>14} {'prefill512 ms':>13} {'x':>5} {'prefill2048 ms':>14} {'x':>5} {'decode ms/tok':>13} {'x':>5}")
        for r in model["rows"]:
            print(f"{r['variant']:>14} {r['prefill_512_ms']:>13.3f} {r['prefill_512_speedup']:>5.2f} "
                  f"{r['prefill_2048_ms']:>14.3f} {r['prefill_2048_speedup']:>5.2f} "
                  f"{r['decode_ms_per_token']:>13.3f} {r['decode_per_token_speedup']:>5.2f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="auto", choices=["auto", "smollm2", "random-1b", "none"],
                        help="model of part 2: SmolLM2-135M when available (auto), a random ~1.1B LLaMA, or none")
    parser.add_argument("--out", default=str(RESULTS), help="JSON file to write")
    args = parser.parse_args(argv)
    problem = cuda_problem()
    if problem:
        print(problem, file=sys.stderr)
        return 2
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    began = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f}s] {message}", flush=True)

    log(f"{torch.cuda.get_device_name()} torch {torch.__version__} CUDA {torch.version.cuda}; "
        f"semi-structured backends: {', '.join(backends())}")
    with torch.inference_mode():
        linears = bench_linears(log)
    model = None
    if args.model != "none":
        try:
            model = bench_model({"random-1b": "random"}.get(args.model, args.model), log)
        except Exception as err:  # noqa: BLE001 - keep part 1's results; say what failed
            import traceback

            traceback.print_exc()
            model = {"error": f"{type(err).__name__}: {err}"}
    result = {
        "protocol": {"dtype": "float16", "shapes_out_x_in": [f"{o}x{i}" for o, i in SHAPES], "tokens": TOKENS,
                     "timing": "median of CUDA-event timed back-to-back launches after warm-up",
                     "model": "prefill 1x512 and 1x2048 (last logits only), greedy decode after 128 tokens"},
        "machine": {"gpu": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
                    "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                    "backends": backends()},
        "linears": linears, "model": model, "seconds": time.perf_counter() - began,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print()
    print_tables(linears, model)
    print(f"\nwrote {out} ({result['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
