"""Seconds per linear of each permutation search at LLaMA-3.1-8B shapes, on the CPU or a GPU.

Each row searches one random linear of an 8B shape (q/o: 4096 x 4096, k/v: 1024 x 4096, gate/up:
14336 x 4096, down: 4096 x 14336; out x in) with Wanda scores from random inputs of 2,048 tokens (the Gram
matrix of the same inputs for ``output``), as the pipeline does with per-linear binding, in its own process
with a time limit: a row that runs out is recorded as "> limit". Prints a table and writes
bench/results/search_speed.json (``search_speed_gpu.json`` on a GPU).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import time

from common import print_table, save_json

SHAPES = {"q 4096x4096": (4096, 4096), "k 1024x4096": (1024, 4096), "gate 14336x4096": (14336, 4096),
          "down 4096x14336": (4096, 14336)}
METHODS = ("ria", "cp", "output")


def search_seconds(method: str, shape: str, device: str) -> float:
    """Seconds of one ``method`` search of a random linear of ``shape`` on ``device``."""
    import torch

    from permsparse.permute.search import find_permutation
    from permsparse.sparsity.scores import wanda

    rows, cols = SHAPES[shape]
    gen = torch.Generator(device=device).manual_seed(0)
    weight = torch.randn(rows, cols, device=device, generator=gen)
    x = torch.randn(2048, cols, device=device, generator=gen) * torch.rand(cols, device=device, generator=gen)
    scores = wanda(weight, x.norm(dim=0))
    gram = x.T @ x if method == "output" else None
    synchronise = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    synchronise()
    started = time.perf_counter()
    find_permutation(scores, 2, 4, method, weight=weight, gram=gram)
    synchronise()
    return time.perf_counter() - started


def _child(method: str, shape: str, device: str, queue) -> None:
    queue.put(search_seconds(method, shape, device))


def timed(method: str, shape: str, device: str, limit: float) -> float | None:
    """:func:`search_seconds` in a fresh process; None when it outlasts ``limit`` seconds."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(method, shape, device, queue))
    process.start()
    process.join(limit)
    if process.is_alive():
        process.kill()
        process.join()
        return None
    return queue.get()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--limit", type=float, default=1800, help="seconds one search may take")
    args = parser.parse_args()
    results = []
    for shape in args.shapes:
        for method in args.methods:
            seconds = timed(method, shape, args.device, args.limit)
            results.append({"shape": shape, "method": method, "seconds": seconds, "limit": args.limit})
            shown = f"{seconds:.1f} s" if seconds is not None else f"> {args.limit:.0f} s"
            print(f"  {method} {shape}: {shown}", flush=True)
    print_table(results, [("shape", "linear (out x in)", ""), ("method", "search", ""), ("seconds", "s", ".1f")])
    name = "search_speed" if args.device == "cpu" else "search_speed_gpu"
    print(f"saved {save_json(name, vars(args), results)}")


if __name__ == "__main__":
    main()
