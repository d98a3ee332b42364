"""How long the command line takes to answer what needs no model: ``--help`` and an argument error.

Protocol: each command runs ``--repeats`` times in a fresh ``python -m permsparse`` process (the venv's
interpreter, this checkout on PYTHONPATH, HF_HUB_OFFLINE=1); the table gives the median and the largest
wall-clock seconds and the median CPU seconds of the child (user + system, from ``os.wait4``: what the
process itself cost, less distorted by other load on the machine than the wall clock). Whether torch or
transformers were imported is read from ``-X importtime``. Results go to ``bench/results/cli_latency.json``.

    python bench/cli_latency.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
COMMANDS = {
    "prune --help": ["prune", "--help"],
    "prune --pattern 5:4": ["prune", "--pattern", "5:4", "--out", "never-written"],
    "prune --distill-lr alone": ["prune", "--distill-lr", "1e-3", "--out", "never-written"],
    "eval --help": ["eval", "--help"],
    "check --help": ["check", "--help"],
}


def run_once(args: list[str]) -> tuple[float, float, int, bool]:
    """Wall seconds, CPU seconds, exit code, and whether torch or transformers was imported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "permsparse", *args], env=env, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    heavy = any(line.rstrip().endswith((" torch", " transformers")) for line in stderr.splitlines())
    return wall, usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status), heavy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for name, command in COMMANDS.items():
        runs = [run_once(command) for _ in range(args.repeats)]
        walls, cpus = [r[0] for r in runs], [r[1] for r in runs]
        rows.append({"command": name, "exit": runs[0][2], "wall_median_s": statistics.median(walls),
                     "wall_max_s": max(walls), "cpu_median_s": statistics.median(cpus),
                     "imports_torch": any(r[3] for r in runs)})
    print(f"{'command':28} {'exit':>4} {'wall median':>11} {'wall max':>9} {'cpu median':>10}  torch imported")
    for row in rows:
        print(f"{row['command']:28} {row['exit']:>4} {row['wall_median_s']:>10.2f}s {row['wall_max_s']:>8.2f}s "
              f"{row['cpu_median_s']:>9.2f}s  {row['imports_torch']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "cli_latency.json"
    out.write_text(json.dumps({"protocol": __doc__.split("\n\n")[1], "repeats": args.repeats, "rows": rows,
                               "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                                          f"{os.cpu_count()} CPUs", "load_average": os.getloadavg(),
                               "date": datetime.datetime.now().isoformat(timespec="seconds"),
                               "command": "python bench/cli_latency.py " + " ".join(sys.argv[1:])}, indent=1))
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
