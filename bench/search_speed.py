"""Seconds per linear of each permutation search at LLaMA-3.1-8B shapes, on the CPU or a GPU.

Each row searches one random linear of an 8B shape (q/o: 4096 x 4096, k/v: 1024 x 4096, gate/up:
14336 x 4096, down: 4096 x 14336; out x in) with Wanda scores from random inputs of 2,048 tokens (the Gram
matrix of the same inputs for ``output``), as the pipeline does with per-linear binding, in its own process
with ``--threads`` torch threads and a time limit: a row that runs out is recorded as "> limit".

``--baseline REF`` runs every row a second time, right after, with permsparse as it is at git ``REF`` (unpacked
into a temporary folder), and records whether both found the same permutation: a speed-up is only one when
the permutation is bitwise the same. The load average before and after each row goes with it (other work on
the machine stretches the seconds). Prints a table and writes bench/results/search_speed.json
(``search_speed_gpu.json`` on a GPU).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from common import print_table, save_json

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"q 4096x4096": (4096, 4096), "k 1024x4096": (1024, 4096), "gate 14336x4096": (14336, 4096),
          "down 4096x14336": (4096, 14336)}
METHODS = ("ria", "cp", "output")


def search_seconds(method: str, shape: str, device: str) -> tuple[float, list[int]]:
    """Seconds of one ``method`` search of a random linear of ``shape`` on ``device``, and its permutation."""
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
    p = find_permutation(scores, 2, 4, method, weight=weight, gram=gram)
    synchronise()
    return time.perf_counter() - started, p.tolist()


def _child(method: str, shape: str, device: str, threads: int, tree: str | None, queue) -> None:
    if tree is not None:  # the baseline's permsparse first on the path
        sys.path.insert(0, tree)
        for name in [n for n in sys.modules if n == "permsparse" or n.startswith("permsparse.")]:
            del sys.modules[name]
    import torch

    torch.set_num_threads(threads)
    queue.put(search_seconds(method, shape, device))


def timed(method: str, shape: str, device: str, limit: float, threads: int,
          tree: str | None = None) -> tuple[float | None, list[int] | None]:
    """:func:`search_seconds` in a fresh process (with permsparse from ``tree`` when given); None when it
    outlasts ``limit`` seconds."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(method, shape, device, threads, tree, queue))
    process.start()
    process.join(limit)
    if process.is_alive():
        process.kill()
        process.join()
        return None, None
    return queue.get()


def unpack(ref: str, into: str) -> str:
    """``permsparse/`` as it is at git ``ref``, unpacked under ``into``; the folder to put on the path."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "permsparse"], check=True,
                             capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(into, filter="data")
    return into


def shown(seconds: float | None, limit: float) -> str:
    return f"{seconds:.1f} s" if seconds is not None else f"> {limit:.0f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--limit", type=float, default=1800, help="seconds one search may take")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each search")
    parser.add_argument("--baseline", default=None, metavar="REF",
                        help="also run each row with permsparse at this git revision and compare permutations")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        tree = unpack(args.baseline, scratch) if args.baseline else None
        for shape in args.shapes:
            for method in args.methods:
                load = os.getloadavg()[0]
                seconds, p = timed(method, shape, args.device, args.limit, args.threads)
                row = {"shape": shape, "method": method, "seconds": seconds, "limit": args.limit,
                       "threads": args.threads, "load_before": round(load, 2)}
                if tree is not None:
                    row["baseline_seconds"], base = timed(method, shape, args.device, args.limit, args.threads, tree)
                    row["same_permutation"] = None if p is None or base is None else p == base
                    if seconds and row["baseline_seconds"]:
                        row["speedup"] = row["baseline_seconds"] / seconds
                row["load_after"] = round(os.getloadavg()[0], 2)
                results.append(row)
                print(f"  {method} {shape}: {shown(seconds, args.limit)}"
                      + (f" (baseline {shown(row['baseline_seconds'], args.limit)}, same permutation: "
                         f"{row['same_permutation']})" if tree is not None else "")
                      + f"; load {row['load_before']} -> {row['load_after']}", flush=True)
    columns = [("shape", "linear (out x in)", ""), ("method", "search", ""), ("seconds", "s", ".1f")]
    if args.baseline:
        columns += [("baseline_seconds", f"s at {args.baseline}", ".1f"), ("speedup", "speed-up", ".2f"),
                    ("same_permutation", "same p", "")]
    print_table(results, columns + [("load_before", "load before", ".2f"), ("load_after", "load after", ".2f")])
    name = "search_speed" if args.device == "cpu" else "search_speed_gpu"
    print(f"saved {save_json(name, vars(args), results)}")


if __name__ == "__main__":
    main()
