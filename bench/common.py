"""Shared harness for the benchmarks: one fresh process per row, a printed table, a JSON file.

Each row runs in its own (spawned) process so its peak memory is its own, and rows never see each
other's pruned weights.
"""
from __future__ import annotations

import json
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor, as_completed
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
RESULTS = Path(__file__).resolve().parent / "results"


def _run_row(model: str, row: dict, seqlen: int, windows: int, full: bool, threads: int) -> dict:
    import torch

    from permsparse import PruneConfig, load_model, perplexity, prune
    from permsparse.evaluation import eval_tokens
    from permsparse.pruning import peak_rss_mb

    torch.set_num_threads(threads)
    model_, tokenizer = load_model(model)
    result = {"label": row["label"], "prune_s": 0.0}
    if row.get("config") is not None:
        report = prune(model_, tokenizer, PruneConfig(**row["config"]), progress=False)
        result["prune_s"] = report.seconds
        result["layers"] = report.layers
        result["training"] = report.training
    ids = eval_tokens(tokenizer)
    fixed = perplexity(model_, tokenizer, seqlen=seqlen, windows=windows, ids=ids, progress=False)
    result["ppl"] = fixed.ppl
    if full:
        result["ppl_full"] = perplexity(model_, tokenizer, seqlen=seqlen, ids=ids, progress=False).ppl
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def add_protocol_args(parser) -> None:
    """The options every benchmark shares: model, evaluation windows, calibration, seed, full test set."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=16, help="first K evaluation windows")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="also the full test set (slow on CPU)")
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once, each in its own process")


def run_rows(
    model: str, rows: list[dict], *, seqlen: int, windows: int, full: bool, threads: int = 1, jobs: int = 1
) -> list[dict]:
    """Run every row in a fresh process (``jobs`` at a time), printing each as it finishes.

    With ``jobs > 1`` rows share the machine, so their seconds include that contention.
    """
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = [pool.submit(_run_row, model, row, seqlen, windows, full, threads) for row in rows]
        for future in as_completed(futures):
            result = future.result()
            print(f"  done: {result['label']:<34} ppl {result['ppl']:9.2f}  ({result['prune_s']:.0f} s pruning)",
                  flush=True)
        return [future.result() for future in futures]


def print_table(results: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """``columns``: (key, header, format)."""
    headers = [h for _, h, _ in columns]
    cells = [[format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns] for r in results]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def save_json(name: str, protocol: dict, results: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    machine = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count()}
    path.write_text(json.dumps({"protocol": protocol, "machine": machine, "results": results}, indent=1))
    return path
