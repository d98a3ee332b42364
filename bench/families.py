"""The family sweep: every causal-LM and image-text-to-text model type of the installed transformers, tiny and
random, pruned and judged as :mod:`tiny_types` says (``permsparse prune --perm ria --export folded`` at 2:4,
``permsparse check``, reloaded with plain transformers, every matrix inside the blocks counted).

Protocol: one fresh process per type (forked from a server that has imported torch, transformers and
permsparse once), ``--jobs`` at a time, one torch thread each, killed after ``--timeout`` seconds (a hang is a
crash); each type's output goes to its own log under the work folder. Prints a table, saves
``bench/results/families.json`` (the table of docs/results.md, ``python3 bench/tables.py``).

    flock /tmp/permsparse-heavy.lock python3 bench/families.py --jobs 1
    python3 bench/families.py --types qwen3_next jamba --save-as families-some
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, save_json  # noqa: E402
import tiny_types  # noqa: E402

STATUSES = ("pass", "refused", "fails", "crash", "cannot be built")
MEMORY_LIMIT = 6 << 30  # address space of one type's process: a model that is not tiny fails, the machine stays up


def _child(model_type: str, workdir: str, token_folder: str, conn) -> None:
    """One type's verdict, its output in ``workdir/log.txt``, sent back through ``conn``."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    log = os.open(Path(workdir) / "log.txt", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    outcome = tiny_types.verdict(model_type, Path(workdir), Path(token_folder))
    conn.send(tiny_types.as_dict(outcome))
    conn.close()


def sweep(types: list[str], jobs: int, timeout: float, root: Path, show=print) -> list[dict]:
    """Every type's verdict (as a dict), each in its own process, ``jobs`` at a time, in the order of ``types``."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "permsparse.cli.commands", "tiny_types"])
    token_folder = root / "tokenizer"
    tiny_types.tokenizer(token_folder)
    waiting, running, done = list(types), {}, {}
    while waiting or running:
        while waiting and len(running) < jobs:
            t = waiting.pop(0)
            workdir = root / t
            workdir.mkdir(parents=True, exist_ok=True)
            ours, theirs = ctx.Pipe(duplex=False)
            process = ctx.Process(target=_child, args=(t, str(workdir), str(token_folder), theirs), daemon=True)
            process.start()
            theirs.close()
            running[t] = (process, ours, time.monotonic())
        time.sleep(0.05)
        for t, (process, conn, started) in list(running.items()):
            result = None
            if conn.poll():
                try:
                    result = conn.recv()
                except EOFError:
                    result = None
            elapsed = time.monotonic() - started
            if result is None and process.is_alive() and elapsed < timeout:
                continue
            if result is None:
                if process.is_alive():
                    process.kill()
                    message = f"no verdict in {timeout:.0f} s: killed"
                else:
                    process.join()
                    message = f"process died with exit code {process.exitcode} (see {root / t / 'log.txt'})"
                result = tiny_types.as_dict(tiny_types.Outcome(t, tiny_types.mappings().get(t, ""), "crash", message,
                                                               seconds=round(elapsed, 2)))
            process.join(5)
            del running[t]
            done[t] = result
            show(f"  {len(done):>3}/{len(types)} {t:<28} {result['status']:<15} {result['seconds']:6.1f} s  "
                 f"{result['message'][:110]}", flush=True)
    return [done[t] for t in types]


def counts(results: list[dict]) -> dict[str, dict[str, int]]:
    """Per mapping (and over all): how many types have each status."""
    out = {}
    for mapping in ("causal-lm", "image-text-to-text", "all"):
        c = Counter(r["status"] for r in results if mapping == "all" or r["mapping"] == mapping)
        out[mapping] = {s: c.get(s, 0) for s in STATUSES}
    return out


def print_table(results: list[dict]) -> None:
    print(f"\n{'type':<28} {'mapping':<19} {'status':<15} {'blocks':>6} {'pruned':>7}  message")
    for r in results:
        pruned = f"{r['half_zero']}/{r['pruned']}" if r["pruned"] else "-"
        print(f"{r['model_type']:<28} {r['mapping']:<19} {r['status']:<15} {r['layers'] or '-':>6} {pruned:>7}  "
              f"{r['message'][:120]}")
    print()
    for mapping, c in counts(results).items():
        print(f"{mapping:<19} " + ", ".join(f"{n} {s}" for s, n in c.items()))


def main() -> int:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", nargs="*", default=None, help="only these model types (default: all)")
    parser.add_argument("--jobs", type=int, default=1, help="types run at once, each in its own process")
    parser.add_argument("--timeout", type=float, default=300, help="seconds before a type's process is killed")
    parser.add_argument("--save-as", default="families", help="name of the JSON file under bench/results")
    parser.add_argument("--workdir", default=None, help="where each type's files and log go (default: a temporary "
                                                         "folder, removed at the end)")
    args = parser.parse_args()
    known = tiny_types.mappings()
    types = args.types or list(known)
    unknown = [t for t in types if t not in known]
    if unknown:
        print(f"families.py: error: not causal-LM or image-text-to-text types here: {', '.join(unknown)}",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="permsparse-families-") as scratch:
        root = Path(args.workdir) if args.workdir else Path(scratch)
        results = sweep(types, args.jobs, args.timeout, root)
    wall = time.perf_counter() - started
    print_table(results)
    print(f"{len(results)} types in {wall:.0f} s wall ({args.jobs} at a time)")
    protocol = {"transformers": transformers.__version__, "types": len(results), "jobs": args.jobs,
                "timeout_s": args.timeout, "wall_s": round(wall, 1), "counts": counts(results),
                "prune": "permsparse prune --perm ria --export folded --calib shakespeare --nsamples 8 --seqlen 32 "
                         "--eval-windows 0 (2:4, per-linear binding)"}
    path = save_json(args.save_as, protocol, results)
    print(f"saved {path} ({machine()['cpu']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
