"""Shared harness for the benchmarks: one fresh process per row, a printed table, a JSON file.

Each row runs in its own (spawned) process so its peak memory is its own and rows never see each other's
pruned weights. A row prunes the model with its config (or not, for the dense row) and evaluates it on
every evaluation text of the protocol. Results go to ``bench/results/NAME.json`` with the protocol,
the machine, the date and the command; ``bench/tables.py`` turns them into the tables of the README and
docs/results.md.
"""
from __future__ import annotations

import datetime
import json
import multiprocessing as mp
import os
import platform
import shlex
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing
RESULTS = Path(__file__).resolve().parent / "results"
EVAL_NAMES = {"wikitext2": "WikiText-2 test", "shakespeare": "Tiny Shakespeare", "alpaca": "Alpaca",
              "wikitext2-valid": "WikiText-2 valid", "c4-demo": "C4 (c4-demo)"}


@dataclass
class Protocol:
    """How every row is evaluated: the first ``windows`` windows of ``seqlen`` tokens of each text."""

    model: str
    seqlen: int
    windows: int
    evals: tuple[str, ...]
    full: bool = False
    threads: int = 1
    tasks: tuple[str, ...] = ()
    limit: int | None = None


@dataclass
class Row:
    label: str
    config: object | None  # a PruneConfig, or None for the dense model


def add_row_args(parser, save_as: str | None = None, threads: int = 1) -> None:
    """How rows run (``--jobs`` processes of ``--threads`` threads, only ``--rows``) and, with ``save_as``,
    the JSON file they go to (``--save-as``)."""
    parser.add_argument("--jobs", type=int, default=1, help="rows run at once, each in its own process")
    parser.add_argument("--threads", type=int, default=threads, help="torch threads per row")
    parser.add_argument("--rows", nargs="*", default=None, help="run only the rows with these labels")
    if save_as is not None:
        parser.add_argument("--save-as", default=save_as, help="name of the JSON file under bench/results")


def add_protocol_args(parser, evals=("wikitext2", "shakespeare"), seeds: bool = False, reuse: bool = False) -> None:
    """The options every benchmark shares: model, evaluation windows and texts, calibration, seed, jobs;
    with ``seeds``, ``--seeds`` too (every row once per seed, see :func:`seed_suffixes`); with ``reuse``,
    ``--reuse`` (rows taken from stored results, see :func:`reusable`)."""
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per calibration and evaluation window")
    parser.add_argument("--windows", type=int, default=16, help="first K evaluation windows of each text")
    parser.add_argument("--evals", nargs="+", default=list(evals), help="evaluation texts")
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="also the whole first evaluation text (slow on CPU)")
    add_row_args(parser)
    parser.add_argument("--tasks", nargs="*", default=[], help="zero-shot tasks of every row (lm-evaluation-harness)")
    parser.add_argument("--limit", type=int, default=None, help="first N items of each zero-shot task")
    if reuse:
        parser.add_argument("--reuse", nargs="*", default=[], metavar="NAME",
                            help="take rows from bench/results/NAME.json that match a row here (label, config, "
                                 "protocol, CPU and torch) instead of running them again; the stored commit is the "
                                 "caller's to check; NAME.partial resumes an interrupted run of the same command")
    if seeds:
        parser.add_argument("--seeds", nargs="+", type=int, default=None,
                            help="run every row once per seed (default: --seed alone) and summarise over the seeds")


def seed_suffixes(args) -> dict[int, str]:
    """Seed -> the suffix of its rows' labels (``" | seed S"``; none when one seed runs)."""
    seeds = args.seeds or [args.seed]
    return {s: f" | seed {s}" if len(seeds) > 1 else "" for s in seeds}


def protocol_from(args) -> Protocol:
    return Protocol(args.model, args.seqlen, args.windows, tuple(args.evals), args.full, args.threads,
                    tuple(args.tasks), args.limit)


def _run_row(row: Row, protocol: Protocol) -> dict:
    import time

    import torch

    from permsparse import load_model, perplexity, prune
    from permsparse.data.text import check_disjoint, token_stream
    from permsparse.report import peak_rss_mb
    from permsparse.serial import to_dict

    torch.set_num_threads(protocol.threads)
    model, tokenizer = load_model(protocol.model)
    result = {"label": row.label, "prune_s": 0.0, "config": None if row.config is None else to_dict(row.config)}
    if row.config is not None:
        for k, source in enumerate(protocol.evals):
            check_disjoint(tokenizer, row.config.calibration.source, source, protocol.seqlen,
                           None if protocol.full and k == 0 else protocol.windows)
        report = prune(model, tokenizer, row.config, progress=False)
        result.update(prune_s=report.seconds, layers=to_dict(report.layers), training=to_dict(report.training),
                      kept_start=list(report.kept_start), stages=dict(report.stages),
                      distillation=to_dict(report.distillation))
    result["ppl"] = {}
    started = time.perf_counter()
    for source in protocol.evals:
        ids = token_stream(tokenizer, source)
        result["ppl"][source] = perplexity(model, tokenizer, seqlen=protocol.seqlen, windows=protocol.windows,
                                           ids=ids, progress=False).ppl
    if protocol.full:
        first = protocol.evals[0]
        result["ppl_full"] = perplexity(model, tokenizer, seqlen=protocol.seqlen, source=first, progress=False).ppl
    if getattr(protocol, "tasks", ()):
        from permsparse.evaluate.zeroshot import zero_shot

        scores = zero_shot(model, tokenizer, list(protocol.tasks), limit=protocol.limit, progress=False)
        result["zero_shot"] = {s.task: s.acc for s in scores}
        result["zero_shot_items"] = {s.task: s.items for s in scores}
        result["zero_shot"]["mean"] = sum(s.acc for s in scores) / len(scores)
        result["zero_shot_norm"] = {s.task: s.acc_norm for s in scores if s.acc_norm is not None}
        result["zero_shot_correct"] = {s.task: "".join(map(str, s.correct)) for s in scores}  # "1011...": item by item
    result["eval_s"] = time.perf_counter() - started
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def _guarded_row(row: Row, protocol: Protocol) -> dict:
    """A row's result, or its label and the error that stopped it (one failing row loses no other)."""
    import traceback

    try:
        return _run_row(row, protocol)
    except Exception:  # noqa: BLE001 - reported in the results and on the console
        return {"label": row.label, "error": traceback.format_exc()}


def guarded(run_row, row: Row, args) -> dict:
    """``run_row(row, args)``, or the row's label and the error that stopped it (one failing row loses no
    other)."""
    import traceback

    try:
        return run_row(row, args)
    except Exception:  # noqa: BLE001 - reported in the results and on the console
        return {"label": row.label, "error": traceback.format_exc()}


def run_spawned(rows: list[Row], args, run_row, describe) -> list[dict]:
    """Every row through ``run_row(row, args)`` in a fresh (spawned) process, ``args.jobs`` at a time (only
    the labels in ``args.rows`` when given), each printed as it finishes (``describe(result)``)."""
    if args.rows is not None:
        rows = [r for r in rows if r.label in args.rows]
    done: dict[str, dict] = {}
    with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
        for future in as_completed([pool.submit(guarded, run_row, row, args) for row in rows]):
            r = future.result()
            done[r["label"]] = r
            print(f"  FAILED: {r['label']}\n{r['error']}" if "error" in r else f"  done: {describe(r)}", flush=True)
    return [done[row.label] for row in rows if row.label in done]


def machine() -> dict:
    """What a result's last bits depend on beyond the code: Python, platform, CPUs, torch and its kernels."""
    import torch

    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "torch": torch.__version__, "cpu": cpu_model(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def reusable(rows: list[Row], protocol: Protocol, names: list[str]) -> dict[str, dict]:
    """Results stored in ``bench/results/NAME.json`` (for each of ``names``) that stand for rows here: the
    same label (or that label without its seed, stored by a one-seed run) and config, evaluated on every
    text here under the same model, windows, tasks and items, on a machine with the same CPU model, torch
    and kernel level (on which the same command gives the same bits). Each keeps the evaluations here and
    records the file it came from."""
    from permsparse import PruneConfig
    from permsparse.serial import to_dict

    defaults = to_dict(PruneConfig())

    def completed(config: dict | None, default: dict = defaults) -> dict | None:
        """A stored config with the fields it predates at their defaults, at every level: the code that ran it
        had no such field, so it ran as the default does (no distillation, fixed masks, say)."""
        if config is None:
            return None
        out = {k: v for k, v in default.items() if k not in config}
        for k, v in config.items():
            nested = isinstance(v, dict) and isinstance(default.get(k), dict) and v.get("kind") == default[k].get("kind")
            out[k] = completed(v, default[k]) if nested else v
        return out

    wanted = {r.label: (None if r.config is None else to_dict(r.config)) for r in rows}
    stands_for: dict[str, list[str]] = {}  # stored label -> the labels here it may stand for
    for label in wanted:
        stands_for.setdefault(label, []).append(label)
        method, seed = seed_of(label)
        if seed is not None:  # a one-seed run's label carries no seed: its config's seed decides
            stands_for.setdefault(method, []).append(label)
    here = {k: machine()[k] for k in ("cpu", "cpu_capability", "torch")}
    found: dict[str, dict] = {}
    for name in names:
        stored = json.loads((RESULTS / f"{name}.json").read_text())
        p = stored["protocol"]
        same = (p["model"] == protocol.model and p["seqlen"] == protocol.seqlen and p["windows"] == protocol.windows
                and tuple(p.get("tasks") or ()) == protocol.tasks and p.get("limit") == protocol.limit
                and not protocol.full and all(stored["machine"].get(k) == v for k, v in here.items()))
        for r in stored["results"] if same else ():
            for label in stands_for.get(r["label"], ()):
                if (label not in found and "error" not in r and completed(r["config"]) == wanted[label]
                        and all(t in r["ppl"] for t in protocol.evals)):
                    found[label] = {**{k: v for k, v in r.items() if k != "gap"}, "label": label,
                                    "ppl": {t: r["ppl"][t] for t in protocol.evals}, "reused_from": name}
    return found


def run_rows(rows: list[Row], protocol: Protocol, jobs: int = 1, only: list[str] | None = None,
             partial: str | None = None, reuse: list[str] = ()) -> list[dict]:
    """Run every row (or those labelled in ``only``) in a fresh process, ``jobs`` at a time, printing each
    as it finishes and, with ``partial``, saving what is done so far to ``bench/results/PARTIAL.partial.json``
    (in the shape of a finished result, so ``--reuse PARTIAL.partial`` resumes an interrupted run).
    Rows that the results named in ``reuse`` already hold (:func:`reusable`) are taken from there.
    With ``jobs > 1`` rows share the machine, so their seconds include that contention."""
    if only is not None:  # a method's label selects its rows of every seed
        rows = [r for r in rows if r.label in only or seed_of(r.label)[0] in only]
    done: dict[str, dict] = reusable(rows, protocol, list(reuse)) if reuse else {}
    for label, r in done.items():
        print(f"  reused: {label:<40} from {r['reused_from']}", flush=True)
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = [pool.submit(_guarded_row, row, protocol) for row in rows if row.label not in done]
        for future in as_completed(futures):
            r = future.result()
            done[r["label"]] = r
            if "error" in r:
                print(f"  FAILED: {r['label']}\n{r['error']}", flush=True)
            else:
                ppl = ", ".join(f"{k} {v:.2f}" for k, v in r["ppl"].items())
                print(f"  done: {r['label']:<40} ppl {ppl} ({r['prune_s']:.0f} s pruning)", flush=True)
            if partial:
                save_partial(partial, protocol, list(done.values()))
    return [done[row.label] for row in rows]


def save_partial(name: str, protocol: Protocol, results: list[dict]) -> Path:
    """``bench/results/NAME.partial.json``: the rows done so far, stored as a finished result so that
    ``--reuse NAME.partial`` takes them back."""
    return save_json(f"{name}.partial", asdict(protocol), results)


def gap_closed(results: list[dict], none: str, limit: str) -> None:
    """Add ``gap`` per evaluation text: (ppl of ``none`` - ppl) / (ppl of ``none`` - ppl of ``limit``)."""
    by_label = {r["label"]: r for r in results if "error" not in r}
    if none not in by_label or limit not in by_label:
        return
    for r in results:
        if r.get("config") is None or "error" in r:
            continue
        r["gap"] = {}
        for text, ppl in r["ppl"].items():
            span = by_label[none]["ppl"][text] - by_label[limit]["ppl"][text]
            r["gap"][text] = (by_label[none]["ppl"][text] - ppl) / span if span else None


def calib_label(calib: str, temperature: float = 1.0) -> str:
    """How ``bench/learned.py`` rows name their calibration: the source, and the temperature of sampled text
    when it is not 1."""
    return calib if temperature == 1.0 else f"{calib} at temperature {temperature:g}"


def seed_of(label: str) -> tuple[str, int | None]:
    """``"c4 | ria | seed 2"`` -> ``("c4 | ria", 2)``; a label without a seed -> ``(label, None)``."""
    head, sep, tail = label.rpartition(" | seed ")
    return (head, int(tail)) if sep and tail.isdigit() else (label, None)


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def gap_closed_by_seed(results: list[dict], none: str, limit: str) -> None:
    """:func:`gap_closed` within each seed's rows, against that seed's ``none`` and ``limit`` rows."""
    seeds: dict[int | None, list[dict]] = {}
    for r in results:
        seeds.setdefault(seed_of(r["label"])[1], []).append(r)
    for seed, group in seeds.items():
        suffix = "" if seed is None else f" | seed {seed}"
        gap_closed(group, none + suffix, limit + suffix)


def across_seeds(results: list[dict], reference: str) -> list[dict]:
    """Rows labelled ``... | seed S`` grouped by method: per text the mean and standard deviation over the
    seeds of perplexity and gap closed, and of the perplexity and the gap closed minus ``reference``'s (the
    method of that name, paired seed by seed, where it has every seed of the method); mean pruning seconds.
    Methods in the order they first appear."""
    by_method: dict[str, dict[int, dict]] = {}
    for r in results:
        method, seed = seed_of(r["label"])
        if seed is not None and "error" not in r:
            by_method.setdefault(method, {})[seed] = r
    ref = by_method.get(reference, {})
    summary = []
    for method, runs in by_method.items():
        pruned = all(r.get("config") is not None for r in runs.values())
        row = {"label": method, "seeds": sorted(runs), "ppl": {}, "gap": {}, "gap_minus_ref": {}, "ppl_minus_ref": {},
               "prune_s": mean_sd([r["prune_s"] for r in runs.values()])[0] if pruned else None}
        for t in next(iter(runs.values()))["ppl"]:
            row["ppl"][t] = mean_sd([r["ppl"][t] for r in runs.values()])
            if method != reference and all(t in ref.get(s, {}).get("ppl", {}) for s in runs):
                row["ppl_minus_ref"][t] = mean_sd([r["ppl"][t] - ref[s]["ppl"][t] for s, r in runs.items()])
            gaps = {s: (r.get("gap") or {}).get(t) for s, r in runs.items()}
            if None in gaps.values():
                row["gap"][t] = (None, None)
                continue
            row["gap"][t] = mean_sd(list(gaps.values()))
            paired = [gaps[s] - ref[s]["gap"][t] for s in runs if (ref.get(s, {}).get("gap") or {}).get(t) is not None]
            if method != reference and len(paired) == len(runs):  # every seed has the reference's
                row["gap_minus_ref"][t] = mean_sd(paired)
        summary.append(row)
    return summary


def print_seeds(results: list[dict], reference: str) -> None:
    """Each method's mean ± sd over the seeds, per text, and its gap closed minus ``reference``'s."""
    print(f"\nmean ± sd over seeds; gap closed minus {reference}'s, paired by seed:")
    for r in across_seeds(results, reference):
        cells = []
        for t, (m, sd) in r["ppl"].items():
            g, gsd = r["gap"][t]
            cell = f"{t} {m:.2f}±{sd:.2f}" + ("" if g is None else f" gap {g:.3f}±{gsd:.3f}")
            if t in r["gap_minus_ref"]:
                cell += " ({:+.3f}±{:.3f})".format(*r["gap_minus_ref"][t])
            cells.append(cell)
        print(f"  {r['label']:<45} {'  '.join(cells)}")


def paired_difference(a: dict, b: dict) -> dict[str, tuple[float, float]] | None:
    """Zero-shot accuracy of row ``a`` minus row ``b`` on the same items: per task and for the mean over
    tasks, the mean difference and its paired standard error (per task: the standard deviation of the
    item differences over the square root of the items; the mean's: the root sum of squares over the tasks).
    None when either row lacks item results or they were scored on different items."""
    ca, cb = a.get("zero_shot_correct"), b.get("zero_shot_correct")
    if not ca or not cb or ca.keys() != cb.keys() or any(len(ca[t]) != len(cb[t]) for t in ca):
        return None
    out = {}
    for task in ca:
        d = [int(x) - int(y) for x, y in zip(ca[task], cb[task])]
        n = len(d)
        mean = sum(d) / n
        var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else float("nan")
        out[task] = (mean, (var / n) ** 0.5)
    tasks = len(out)
    out["mean"] = (sum(m for m, _ in out.values()) / tasks, sum(se ** 2 for _, se in out.values()) ** 0.5 / tasks)
    return out


def print_paired(results: list[dict], versus: list[str]) -> None:
    """For each row against each label of ``versus``: the paired zero-shot difference (accuracy points)."""
    by_label = {r["label"]: r for r in results if "error" not in r}
    for ref in versus:
        if ref not in by_label:
            continue
        for r in results:
            diff = None if r["label"] == ref else paired_difference(r, by_label[ref])
            if diff is not None:
                cells = "  ".join(f"{t} {100 * m:+.1f}±{100 * se:.1f}" for t, (m, se) in diff.items())
                print(f"  {r['label']} - {ref}: {cells}")


def print_table(results: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """``columns``: (key, header, format); a key ``a.b`` reads ``r[a][b]``."""

    def cell(r, key, fmt):
        value = r
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return "-" if value is None else format(value, fmt)

    headers = [h for _, h, _ in columns]
    cells = [[cell(r, k, f) for k, _, f in columns] for r in results]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for c in cells:
        print("  ".join(v.ljust(w) for v, w in zip(c, widths)))


def ppl_columns(protocol: Protocol, gap: bool = True) -> list[tuple[str, str, str]]:
    columns = []
    for text in protocol.evals:
        columns.append((f"ppl.{text}", f"{text} ppl", ".2f"))
        if gap:
            columns.append((f"gap.{text}", f"{text} gap", ".3f"))
    for task in (*protocol.tasks, "mean") if protocol.tasks else ():
        columns.append((f"zero_shot.{task}", task, ".3f"))
    return columns


def cpu_model() -> str:
    """The CPU's model name (matrix kernels, hence the last bits of every result, depend on it)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def commit() -> str:
    """The checkout's commit, with ``+changes`` when tracked files differ from it ("?" outside git)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=root).returncode != 0
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + ("+changes" if dirty else "")


def save_json(name: str, protocol: dict, results) -> Path:
    """``bench/results/NAME.json`` with the protocol, the machine, the date and the command line (the script
    named from the checkout's root, wherever it ran from)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    script = Path(sys.argv[0]).resolve()
    root = RESULTS.parents[1]
    argv = [str(script.relative_to(root)) if script.is_relative_to(root) else sys.argv[0], *sys.argv[1:]]
    payload = {"protocol": protocol, "machine": machine(), "commit": commit(), "date": datetime.date.today().isoformat(),
               "command": "python3 " + shlex.join(argv), "results": results}
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path
