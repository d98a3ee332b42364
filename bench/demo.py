"""The demo (``make demo``): SmolLM2-135M pruned to 2:4 with Wanda, without a permutation, with RIA's
and with the learned one, each by ``permsparse prune`` with every default, then ``permsparse report``.

Each run calibrates as the command does by default (C4) and records its perplexity on the first 16
windows of 512 tokens of WikiText-2 test (the published metric; not calibration text). The learned run
goes first with every core; then the two others share the cores, one thread each, and the dense model's
evaluation takes the core of the first to finish (beside the learned run, even at the lowest priority,
they slow it more than they gain).
The checkpoints and the report land in ``runs/demo/``; ``bench/learned.py`` compares the same methods
on more texts.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import print_table, save_json

from permsparse.models.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
MKL_ANY_CPU = Path(sys.prefix) / "lib" / "libmkl_any_cpu.so"  # built by `make demo` from bench/mkl_any_cpu.c
RUNS = {"none": [], "ria": ["--perm", "ria"], "learned (default)": ["--perm", "learned"]}
TEXTS = ("wikitext2",)


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "permsparse", *args]


def first_to_finish(running: dict[str, subprocess.Popen]) -> tuple[str, subprocess.Popen]:
    """The label and process of the first of ``running`` to exit, taken out of it."""
    while True:
        for label, process in running.items():
            if process.poll() is not None:
                return label, running.pop(label)
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--out", default=str(ROOT / "runs" / "demo"))
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if MKL_ANY_CPU.is_file():  # MKL's kernels chosen by instruction set, not vendor (bench/mkl_any_cpu.c)
        env["LD_PRELOAD"] = " ".join(filter(None, (env.get("LD_PRELOAD"), str(MKL_ANY_CPU))))
    one_thread = {**env, "OMP_NUM_THREADS": "1"}
    folders = {label: out / label.split()[0] for label in RUNS}
    prune = {label: command("prune", "--model", args.model, *flags, "--eval-texts", ",".join(TEXTS), "--out",
                            str(folders[label]), "--overwrite", "--quiet") for label, flags in RUNS.items()}
    started = time.perf_counter()
    print(f"pruning {args.model} to 2:4 three ways, every other option at its default; this takes about 6 minutes "
          "here", flush=True)
    load_model(args.model)  # a packaged model is converted once here, before the runs share its cache
    subprocess.run(prune["learned (default)"], env=env, check=True, stdout=subprocess.DEVNULL)
    print(f"  learned (default): done ({time.perf_counter() - started:.0f} s)", flush=True)
    dense_json = out / "dense.json"
    dense_eval = command("eval", args.model, "--seqlen", "512", "--windows", "16", "--source", TEXTS[0], "--json",
                         str(dense_json), "--quiet")
    dense_json.unlink(missing_ok=True)
    running = {label: subprocess.Popen(prune[label], env=one_thread, stdout=subprocess.DEVNULL)
               for label in ("ria", "none")}
    dense_started = False
    while running:
        label, process = first_to_finish(running)
        if process.returncode != 0:
            raise SystemExit(f"the {label} run failed" + (f"; see {folders[label]}.partial/log.txt"
                                                          if label in folders else ""))
        print(f"  {label}: done ({time.perf_counter() - started:.0f} s)", flush=True)
        if not dense_started:  # on the core the first run to finish leaves free
            running["dense"] = subprocess.Popen(dense_eval, env=one_thread, stdout=subprocess.DEVNULL)
            dense_started = True
    dense = {TEXTS[0]: json.loads(dense_json.read_text())["perplexity"]["ppl"]}
    report_started = time.perf_counter()
    subprocess.run(command("report", *(str(f) for f in folders.values()), "--out", str(out / "report")), env=env,
                   check=True, stdout=subprocess.DEVNULL)
    report_s = time.perf_counter() - report_started
    rows = [{"label": "dense", "ppl": dense, "prune_s": None, "peak_rss_mb": None, "config": None}]
    for label, folder in folders.items():
        record = json.loads((folder / "permsparse.json").read_text())
        rows.append({"label": label, "ppl": {t: record["metrics"][t]["ppl"] for t in TEXTS},
                     "prune_s": record["report"]["seconds"], "peak_rss_mb": record["report"]["peak_rss_mb"],
                     "config": record["config"], "command": record["command"]})
    print_table(rows, [("label", "2:4 Wanda + permutation", "")] + [(f"ppl.{t}", f"{t} ppl", ".2f") for t in TEXTS]
                + [("prune_s", "pruning s", ".0f"), ("peak_rss_mb", "peak MB", ".0f")])
    wall = time.perf_counter() - started
    print(f"{wall:.0f} s in all; report in {report_s:.1f} s: {out / 'report' / 'index.html'}")
    protocol = {"model": args.model, "evals": list(TEXTS), "windows": 16, "seqlen": 512, "jobs": 2,
                "threads": "all for the learned run, then one per run",
                "wall_s": wall, "report_s": report_s, "mkl_any_cpu": MKL_ANY_CPU.is_file(), "calib": rows[-1]["config"]["calibration"]["source"],
                "nsamples": rows[-1]["config"]["calibration"]["nsamples"], "seed": 0}
    print(f"saved {save_json('demo', protocol, rows)}")


if __name__ == "__main__":
    main()
