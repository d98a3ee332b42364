"""Regenerate the result tables of README.md and docs/results.md from ``bench/results/*.json``.

Every table sits in one of those files (the README holds the headline demo table, docs/results.md every
other) between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` and is rewritten from
``bench/results/NAME.json``, with the protocol, the date of the run and its command; a table may be moved
from one file to the other, the markers go with it. A table whose JSON is missing is left as it is.
``--check`` rewrites nothing and exits 1 when either file is not up to date, naming it.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from common import across_seeds, calib_label, paired_difference, seed_of

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
DOCUMENTS = (README, ROOT / "docs" / "results.md")  # every file whose tables are generated
TASK_NAMES = {"arc_easy": "ARC-e", "arc_challenge": "ARC-c", "boolq": "BoolQ", "hellaswag": "HellaSwag",
              "openbookqa": "OBQA", "winogrande": "WinoG", "piqa": "PIQA", "lambada_openai": "LAMBADA",
              "mmlu": "MMLU (5-shot)"}
TEXTS = {"wikitext2": "WikiText-2", "shakespeare": "Shakespeare", "alpaca": "Alpaca (validation)",
         "wikitext2-valid": "WikiText-2 valid", "c4-demo": "C4 demo"}


def fmt(value, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def header(data: dict) -> str:
    """The run's date, machine and command (a section of a JSON that holds several runs, or the whole)."""
    machine = data.get("machine", {})
    cores = machine.get("cpus") or machine.get("cpu_count")
    kind = f" ({machine['cpu']}, {machine['cpu_capability']} kernels)" if machine.get("cpu") else ""
    where = machine.get("gpu") or (f"a {cores}-core CPU{kind}" if cores
                                   else f"a CPU with {machine.get('threads', '?')} torch thread(s)")
    return f"*Run {data.get('date', '?')} on {where}: `{data.get('command', '?')}`.*\n\n"


def table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def ppl_table(data: dict, label_header: str, rows: list[dict], gap: bool = True, strip: str = "") -> str:
    texts = data["protocol"]["evals"]
    headers = [label_header]
    for t in texts:
        headers.append(f"{TEXTS.get(t, t)} ppl")
        if gap:
            headers.append("gap closed")
    tasks = [t for t in data["protocol"].get("tasks", [])]
    if tasks:
        headers += [TASK_NAMES.get(t, t) for t in tasks] + ["mean acc"]
    headers += ["pruning s", "peak RSS MB"]
    body = []
    for r in rows:
        cells = [r["label"].removeprefix(strip)]
        for t in texts:
            cells.append(fmt(r["ppl"].get(t), ".2f"))
            if gap:
                cells.append(fmt((r.get("gap") or {}).get(t), ".3f"))
        accuracy = r.get("zero_shot", {})
        cells += [fmt(100 * accuracy[t] if t in accuracy else None, ".1f") for t in (*tasks, "mean")] if tasks else []
        cells += [fmt(r["prune_s"], ".0f") if r.get("config") else "–", fmt(r.get("peak_rss_mb"), ".0f")]
        body.append(cells)
    return table(headers, body)


def protocol_line(data: dict) -> str:
    p = data["protocol"]
    texts = ", ".join(TEXTS.get(t, t) for t in p["evals"])
    calib = p.get("calib") or ", ".join(p.get("calibs", [])) or "the default calibration"
    zero_shot = ""
    if p.get("tasks"):
        limit = f"the first {p['limit']} items of each" if p.get("limit") else "every item of each"
        shots = " (MMLU 5-shot, the others 0-shot)" if "mmlu" in p["tasks"] else " (0-shot)"
        zero_shot = (f"; zero-shot accuracy (%) through lm-evaluation-harness on {limit} task{shots}, "
                     "mean over the tasks")
    threads = p.get("threads", 1)
    threads = (f"one process per row, {p.get('jobs', 1)} at a time, {threads} thread each" if isinstance(threads, int)
               else f"threads: {threads}")
    seeds = p.get("seeds") or [p["seed"]]
    seeds = f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {', '.join(map(str, seeds))}"
    return (f"Protocol: SmolLM2-135M ({p['model']}), 2:4; calibration {p['nsamples']} x {p['seqlen']} tokens of "
            f"{calib}, {seeds}; evaluation on the first {p['windows']} windows of {p['seqlen']} tokens of "
            f"{texts}{zero_shot}; {threads}.\n\n")


def render_demo(data: dict) -> str:
    return header(data) + protocol_line(data) + ppl_table(data, "2:4 Wanda + permutation", data["results"], gap=False)


def render_oneshot(data: dict) -> str:
    return header(data) + protocol_line(data) + ppl_table(data, "method", data["results"])


def render_zeroshot_paired(data: dict) -> str:
    """Zero-shot accuracy per task, and each row's mean against the reference rows on the same items."""
    tasks = data["protocol"]["tasks"]
    rows = [r for r in data["results"] if "error" not in r]
    refs = [r for r in rows if r["label"] in data["protocol"].get("versus", [])]
    headers = ["method"] + [TASK_NAMES.get(t, t) for t in tasks] + ["mean acc"]
    headers += [f"mean - {r['label']} (paired)" for r in refs]
    body = []
    for r in rows:
        accuracy = r.get("zero_shot", {})
        cells = [r["label"]] + [fmt(100 * accuracy[t] if t in accuracy else None, ".1f") for t in (*tasks, "mean")]
        for ref in refs:
            diff = None if ref is r else paired_difference(r, ref)
            cells.append("–" if diff is None else f"{100 * diff['mean'][0]:+.2f} ± {100 * diff['mean'][1]:.2f}")
        body.append(cells)
    return header(data) + protocol_line(data) + table(headers, body)


def seeds_table(data: dict, results: list[dict], reference: str, strip: str = "") -> str:
    """Each method's mean ± sd over the seeds (perplexity, gap closed) and its gap closed minus
    ``reference``'s, paired seed by seed; when the run has no rows to take a gap from (no none and
    unstructured rows), its perplexity minus ``reference``'s instead, paired seed by seed, and the seeds."""
    texts = data["protocol"]["evals"]
    short = reference.removeprefix(strip)
    rows = across_seeds(results, reference)
    gap = any(r["gap"][t][0] is not None for r in rows for t in texts)
    headers = ["method"] + ([] if gap else ["seeds"])
    for t in texts:
        headers += [f"{TEXTS.get(t, t)} ppl"] + (["gap closed", f"gap - {short}'s"] if gap else [f"- {short}'s"])
    headers.append("pruning s")
    body = []
    for r in rows:
        cells = [r["label"].removeprefix(strip)] + ([] if gap else [",".join(map(str, r["seeds"]))])
        for t in texts:
            (m, sd), (g, gsd) = r["ppl"][t], r["gap"][t]
            minus = r["gap_minus_ref"].get(t) if gap else r["ppl_minus_ref"].get(t)
            cells.append(f"{m:.2f} ± {sd:.2f}" if len(r["seeds"]) > 1 else f"{m:.2f}")
            if gap:
                cells += ["–" if g is None else f"{g:.3f} ± {gsd:.3f}",
                          "–" if minus is None else f"{minus[0]:+.3f} ± {minus[1]:.3f}"]
            else:
                spread = "" if minus is None or len(r["seeds"]) == 1 else f" ± {minus[1]:.2f}"
                cells.append("–" if minus is None else f"{minus[0]:+.2f}{spread}")
        cells.append(fmt(r["prune_s"], ".0f"))
        body.append(cells)
    return table(headers, body)


def zero_shot_seeds_table(data: dict, results: list[dict], reference: str, strip: str = "") -> str:
    """Each method's zero-shot accuracy per task averaged over the seeds, and its mean minus
    ``reference``'s on the same items: per seed, and pooled (the mean of the seeds' differences, with
    the root sum of their squared paired errors over the seed count)."""
    tasks = data["protocol"]["tasks"]
    by_label = {r["label"]: r for r in results if "error" not in r}
    methods: dict[str, dict[int, dict]] = {}
    for r in by_label.values():
        method, seed = seed_of(r["label"])
        methods.setdefault(method, {})[seed] = r
    short = reference.removeprefix(strip)
    headers = ["method"] + [TASK_NAMES.get(t, t) for t in tasks] + ["mean acc", f"mean - {short}'s, per seed",
                                                                     f"mean - {short}'s, pooled"]
    body = []
    for method, runs in methods.items():
        cells = [method.removeprefix(strip)]
        for t in (*tasks, "mean"):
            cells.append(f"{100 * sum(r['zero_shot'][t] for r in runs.values()) / len(runs):.1f}")
        diffs = {s: paired_difference(r, by_label.get(f"{reference} | seed {s}", {})) for s, r in runs.items()}
        diffs = {s: d["mean"] for s, d in diffs.items() if d is not None and method != reference}
        cells.append(", ".join(f"{100 * m:+.2f} ± {100 * se:.2f}" for m, se in diffs.values()) or "–")
        if diffs:
            pooled = sum(m for m, _ in diffs.values()) / len(diffs)
            error = sum(se ** 2 for _, se in diffs.values()) ** 0.5 / len(diffs)
            cells.append(f"{100 * pooled:+.2f} ± {100 * error:.2f}")
        else:
            cells.append("–")
        body.append(cells)
    return table(headers, body)


def render_learned(data: dict) -> str:
    """A ``bench/learned.py`` run: per calibration source, one table of the seed, or each method's mean ±
    sd over several seeds with its gap closed against RIA's paired by seed."""
    out = header(data) + protocol_line(data)
    seeds = data["protocol"].get("seeds") or []
    temperature = data["protocol"].get("sample_temperature", 1.0)
    for calib in (calib_label(c, temperature) for c in data["protocol"]["calibs"]):
        group = [r for r in data["results"] if r["label"].startswith(f"{calib} | ")]
        if group and len(seeds) > 1:
            out += (f"Calibrated on **{calib}**, mean ± standard deviation over {len(seeds)} "
                    f"seeds:\n\n" + seeds_table(data, group, f"{calib} | ria", strip=f"{calib} | ") + "\n")
            if data["protocol"].get("tasks"):
                out += ("Zero-shot accuracy (%), averaged over the seeds:\n\n"
                        + zero_shot_seeds_table(data, group, f"{calib} | ria", strip=f"{calib} | ") + "\n")
        elif group:
            out += f"Calibrated on **{calib}**:\n\n" + ppl_table(data, "method", group, strip=f"{calib} | ") + "\n"
    return out


def render_oneshot_seeds(data: dict) -> str:
    return (header(data) + protocol_line(data)
            + seeds_table(data, data["results"], data["protocol"]["versus"][0]))


def render_permutation(data: dict) -> str:
    parts = data["results"][0]
    out = header(data)
    if "layers" in parts:
        out += table(["method", "efficacy", "error / none", "gap closed", "of ria's remaining gap", "search s"],
                     [[r["label"], fmt(r["efficacy"], ".3f"), fmt(r["err_vs_none"], ".3f"), fmt(r["gap_closed"], ".3f"),
                       fmt(r.get("of_ria_gap"), ".3f"), fmt(r["search_s"], ".1f")] for r in parts["layers"]]) + "\n"
    if "model" in parts:
        texts = data["protocol"]["evals"]
        out += table(["method (binding)"] + [f"{TEXTS.get(t, t)} ppl" for t in texts] + ["pruning s"],
                     [[r["label"]] + [fmt(r["ppl"].get(t), ".2f") for t in texts] + [fmt(r["prune_s"], ".0f")]
                      for r in parts["model"]]) + "\n"
    if "synthetic" in parts:
        out += table(["method", "s @4096", "efficacy", "s @11008", "efficacy", "7B projection h"],
                     [[r["label"], fmt(r["s_4096"], ".1f"), fmt(r["efficacy_4096"], ".3f"), fmt(r["s_11008"], ".1f"),
                       fmt(r["efficacy_11008"], ".3f"), fmt(r["projected_7b_h"], ".2f")] for r in parts["synthetic"]])
    return out


def render_learned_cost(data: dict) -> str:
    (r,) = data["results"]
    p = data["protocol"]
    note = data.get("source", "")
    return header(data) + (f"{note}\n\n" if note else "") + table(
        ["block (hidden / MLP)", "tokens held", "s per step", "s per block", f"{p['blocks']} blocks, h", "peak GiB"],
        [[f"{p['hidden']} / {p['intermediate']}", f"{p['windows']} x {p['seqlen']}", fmt(r["per_step_s"], ".2f"),
          fmt(r["block_s"], ".1f"), fmt(r["projected_model_h"], ".2f"), fmt(r["rows"][-1].get("peak_gib"), ".1f")]])


def render_gpu_speed(data: dict) -> str:
    """``permsparse speed``'s tables of each run and the targets (``bench/gpu_speed.py``); a file written
    before that command, its per-linear table."""
    if "runs" in data:
        from gpu_speed import QUANTIZED, quantized_table

        from permsparse.deploy.speed import format_table

        runs = {name: r for name, r in data["runs"].items() if "error" not in r}
        gpu = next((r["machine"]["gpu"] for r in runs.values() if "machine" in r), "?")
        failed = [f"{name}: {r['error']}" for name, r in data["runs"].items() if "error" in r]
        tables = [quantized_table(r) if name == QUANTIZED else format_table(r) for name, r in runs.items()]
        return (f"*Run {data.get('date', '?')} on {gpu}: `{data['command']}`.*\n\n```\n"
                + "\n\n".join(tables + failed) + "\n```\n\nTargets:\n\n```\n"
                + "\n".join(data["targets"]) + "\n```\n")
    rows = [[r["shape"].replace("x", " x "), str(r["tokens"]), fmt(r["dense_ms"], ".3f"), fmt(r.get("cusparselt_ms"), ".3f"),
             fmt(r.get("cusparselt_graph_ms"), ".3f"),
             fmt(r["dense_ms"] / r["cusparselt_graph_ms"] if r.get("cusparselt_graph_ms") else None, ".2f") + "x",
             fmt(r.get("gather_only_ms"), ".3f")]
            for r in data["linears"]]
    note = data.get("source", "")
    return (header(data) + (f"{note}\n\n" if note else "")
            + table(["linear (out x in)", "tokens", "dense ms", "2:4 ms (eager)", "2:4 ms (graph)", "speed-up (graph)",
                     "input gather ms"], rows))


def render_gpu_check(data: dict) -> str:
    """``bench/gpu_check.py``: one row per part, and the memory estimate of the whole 8B model's runs."""
    from gpu_check import row

    machine = data["machine"]
    lines = [row(name, part) for name, part in data["parts"].items()]
    estimate = ", ".join(f"{k} {v:.1f} GB" for k, v in data["estimate_8b_gb"].items())
    return (f"*Run {data['date']} on {machine['gpu']} (torch {machine['torch']}, CUDA {machine['cuda']}): "
            f"`{data['command']}`.*\n\n| part | s | peak GB | seconds by stage | notes |\n|---|---|---|---|---|\n"
            + "\n".join(lines) + f"\n\nThe memory estimate of the whole LLaMA-3.1-8B model's runs, weights "
            f"included: {estimate}.\n")


def render_vision(data: dict) -> str:
    p = data["protocol"]
    line = (f"Protocol: {p['model']}; calibration {p['nsamples']} seeded images of the {p['calib']} training split "
            f"(seed {p['seed']}), learned rows started from the {p.get('init', 'output')} search, judged on "
            f"{p['holdout']} more and trained {p['steps']} steps of {p['learn_batch']} images; evaluation on {'all' if p.get('limit') is None else p['limit']} CIFAR-10 test "
            "images. Gap closed: share of the top-1 lost by the pattern without permutation that the row wins back, "
            "towards unstructured 50%.\n\n")
    rows = [[r["label"], fmt(100 * r["top1"] if "top1" in r else None, ".2f"),
             fmt(100 * r["top5"] if "top5" in r else None, ".2f"), fmt(r.get("gap"), ".3f"),
             fmt(r.get("gap_dense"), ".3f"), fmt(r.get("prune_s"), ".0f") if r.get("config") else "–", fmt(r.get("peak_rss_mb"), ".0f")]
            for r in data["results"]]
    return header(data) + line + table(["method", "top-1 %", "top-5 %", "gap to 50%", "gap to dense", "pruning s", "peak RSS MB"], rows)


def render_update_cost(data: dict) -> str:
    out = ""
    for section in data.values():
        rows = [[r["linear"], f"{r['out']} x {r['in']}", str(r["per_layer"]), fmt(r["sparsegpt_s"], ".2f"),
                 fmt(r["admm_s"], ".2f"), fmt(r["hessian_batch_s"], ".4f")] for r in section["rows"]]
        proj = section["projection"]
        hours = {h: (proj[f"{h}_model_s"] + proj["hessian_model_s"]) / 3600 for h in ("sparsegpt", "admm")}
        out += (header(section)
                + table(["linear", "out x in", "per layer", "SparseGPT s", "ADMM s", "H, one batch s"], rows)
                + f"\n{section['model']}, {section['layers']} layers, {proj['calib_tokens']} calibration tokens: "
                f"SparseGPT {proj['sparsegpt_model_s'] / 60:.1f} min of updates + {proj['hessian_model_s'] / 60:.1f} "
                f"min of Hessians = **{hours['sparsegpt']:.2f} h**; ADMM {proj['admm_model_s'] / 60:.1f} min + "
                f"{proj['hessian_model_s'] / 60:.1f} min = **{hours['admm']:.2f} h** (block forward passes not "
                "included).\n\n")
    return out


def render_search_speed(data: dict) -> str:
    base = data["protocol"].get("baseline")
    heads = ["linear (out x in)", "search", "threads", "s"] + ([f"s at {base}", "speed-up", "same permutation"] if base else [])
    rows = []
    for r in data["results"]:
        cells = [r["shape"], r["method"], str(r.get("threads", "?")), fmt(r["seconds"], ".1f") if r["seconds"] is not None
                 else f"> {r['limit']:.0f}"]
        if base:
            cells += [fmt(r.get("baseline_seconds"), ".1f"), fmt(r.get("speedup"), ".2f"),
                      {True: "yes", False: "no", None: "–"}[r.get("same_permutation")]]
        rows.append(cells + [f"{r['load_before']:.1f} / {r['load_after']:.1f}" if "load_before" in r else "–"])
    loads = [r.get("load_before", 0) for r in data["results"]] + [r.get("load_after", 0) for r in data["results"]]
    busy = (f"The 1-minute load average reached {max(loads):.1f} on the {data['machine'].get('cpus', '?')} cores: other work "
            "shared them (contended), so the seconds are stretched; the two columns ran one after the other.\n\n"
            if max(loads) > (data["machine"].get("cpus") or 2) else "")
    return header(data) + busy + table(heads + ["load before / after"], rows)


def render_testbed_recipes(data: dict) -> str:
    trained = data.get("trained", {"rows": []})
    cost = {r["label"]: r for r in data.get("cpu_cost", {}).get("rows", [])}
    rows = [[r["label"], fmt(100 * r["val_top1"], ".2f"), fmt(100 * r["test_top1"], ".2f"), fmt(r["train_s"], ".0f"),
             fmt(cost.get(r["label"], {}).get("projected_s"), ".0f")]
            for r in sorted(trained["rows"], key=lambda r: -r.get("val_top1", -1)) if "error" not in r]
    out = header(trained)
    if "cpu_cost" in data:
        out += "CPU projection: " + header(data["cpu_cost"]).strip("\n*") + "\n\n"
    return out + table(["recipe (45,000 training images)", "validation top-1 %", "test top-1 %",
                        "seconds (GPU, 8 at once)", "projected CPU s (50,000 images)"], rows)


def render_vlm(data: dict) -> str:
    p = data["protocol"]
    line = (f"Protocol: {p['model']}; language tower calibrated on {p['nsamples']} x {p['seqlen']} tokens of "
            f"{p['calib']}, vision tower on {p['vision_nsamples']} images of {p['vision_calib']} (seed {p['seed']}), "
            f"learned rows with `permsparse prune --perm learned`'s defaults, judged on {p['holdout']} held-out "
            f"windows; evaluation on {p['limit']} CIFAR-10 test images (a seeded draw) and the first "
            f"{p['text_windows']} windows of {p['seqlen']} tokens of WikiText-2 test. Gap: share of the accuracy the "
            "tower's 2:4 without permutation loses that the row wins back, towards dense.\n\n")
    features = any("feature_cosine" in r for r in data["results"])
    if features:
        line = line[:-2] + (f" Feature cos: mean per-token cosine of what the projector reads (the vision tower's "
                            f"`vision_feature_layer`) to the dense model's, on {p.get('feature_images')} of the "
                            "images.\n\n")
    rows = [[r["label"], fmt(100 * r["accuracy"] if "accuracy" in r else None, ".1f"), fmt(r.get("gap"), ".3f"),
             fmt(r.get("caption_ppl"), ".3f"), *([fmt(r.get("feature_cosine"), ".4f")] if features else []),
             fmt(r.get("wikitext2_ppl"), ".2f"),
             fmt(r.get("prune_s"), ".0f") if r.get("config") else "–", fmt(r.get("peak_rss_mb"), ".0f")]
            for r in data["results"]]
    return header(data) + line + table(["row", "accuracy %", "gap to dense", "caption ppl",
                                        *(["feature cos"] if features else []), "WikiText-2 ppl",
                                        "pruning s", "peak RSS MB"], rows)


def render_encoder(data: dict) -> str:
    p = data["protocol"]
    text = "validation" if p.get("eval") == "validation" else "test"
    line = (f"Protocol: {p['model']}, 2:4 unless stated; calibration {p['nsamples']} x {p['seqlen']} tokens of "
            f"{p['calib']}, seed {p['seed']}; learned rows with `permsparse prune --perm learned`'s defaults (or "
            f"the options in brackets), judged on {p['holdout']} held-out windows; "
            f"evaluation on the first {p['sentences']} passages (lines of eight words or more) of WikiText-2 {text}: "
            "sentence cos, the mean cosine of each passage's mean-pooled embedding to the dense model's; nearest "
            "kept, the share of passages whose nearest other passage is the dense model's; token cos, the mean "
            f"per-token cosine of the final hidden states on {p['windows']} windows of {p['seqlen']} tokens. Gap: "
            "share of the sentence cosine 2:4 without permutation loses that the row wins back.\n\n")
    rows = [[r["label"], fmt(r.get("sentence_cosine"), ".4f"), fmt(r.get("gap"), ".3f"), fmt(r.get("neighbours"), ".3f"),
             fmt(r.get("token_cosine"), ".4f"), fmt(r.get("prune_s"), ".1f") if r.get("config") else "–",
             fmt(r.get("peak_rss_mb"), ".0f")] for r in data["results"]]
    return header(data) + line + table(["row", "sentence cos", "gap closed", "nearest kept", "token cos", "pruning s",
                                        "peak RSS MB"], rows)


def render_quant(data: dict) -> str:
    """bench/quant.py: perplexity of each row and its change against the same pruning unquantized (16-bit; the
    dense model for the dense rows), the bytes of the pruned linears and of the checkpoint against dense bf16."""
    texts = data["protocol"]["evals"]
    by_label = {r["label"]: r for r in data["results"]}
    headers = ["method"] + [f"{TEXTS.get(t, t)} ppl (vs 16-bit)" for t in texts]
    headers += ["linears / bf16", "checkpoint / bf16", "layer error gptq / rtn", "pruning s"]
    rows = []
    for r in data["results"]:
        base, _, kind = r["label"].partition(" | ")
        reference = by_label.get("dense" if base == "dense" else f"{base} | 16-bit")
        cells = [r["label"].replace(" | ", ", ")]  # a "|" would split the markdown cell
        for t in texts:
            change = ("" if reference is None or reference is r or not kind
                      else f" ({100 * (r['ppl'][t] / reference['ppl'][t] - 1):+.1f}%)")
            cells.append(f"{r['ppl'][t]:.2f}{change}")
        errors = (f"{r['layer_error']:.2e} / {r['layer_error_rtn']:.2e}" if r.get("layer_error") is not None else "–")
        cells += [fmt(r.get("pruned_linears_ratio"), ".3f"), fmt(r.get("checkpoint_ratio"), ".3f"), errors,
                  fmt(r.get("prune_s") or None, ".0f")]
        rows.append(cells)
    group = data["protocol"].get("group")
    return (header(data) + protocol_line(data) + f"int4 in groups of {group} permuted inputs; int8 and fp8 one scale "
            "per output channel; every quantized row but `int4 rtn` is GPTQ. Layer error: the mean over the quantized "
            "linears of `sum_r d_r H d_r^T / sum_r w_r H w_r^T`, d = pruned weight minus deployed weight, H on the "
            "calibration inputs.\n\n" + table(headers, rows))


def render_compressed(data: dict) -> str:
    """bench/compressed.py: bytes of a compressed 2:4 checkpoint against the dense and masked folders, its
    logits against the masked export's, and the peak memory of loading each on the CPU."""
    r = data["results"][0]
    mb = 1e6
    rows = [[name, fmt(entry["weights_bytes"] / mb, ".1f"), fmt(entry["folder_bytes"] / mb, ".1f")]
            for name, entry in r["folders"].items()]
    sizes = table(["folder", "weight files MB", "whole folder MB"], rows)
    loads = table(["load (fresh process, then one 512-token forward)", "peak RSS MB", "after loading MB", "s"],
                  [[name, fmt(m["peak_mb"], ".1f"), fmt(m["loaded_mb"], ".1f"), fmt(m["seconds"], ".2f")]
                   for name, m in r["memory"].items()])
    same = ", ".join(f"{k}: {'bitwise equal' if v else 'DIFFERENT'}" for k, v in r["bitwise_equal_to_masked"].items())
    return (header(data) + f"Protocol: {r['model']} at {r['pattern']}, Wanda + {r['perm']}, {r['nsamples']} calibration "
            f"windows; {r['pruned_linears']} pruned linears stored in {r['pruned_bytes'] / mb:.2f} MB against "
            f"{r['pruned_dense_bf16_bytes'] / mb:.2f} MB dense bf16 (**{r['pruned_ratio']:.4f}**); the whole checkpoint's "
            f"weights {r['checkpoint_ratio']:.3f}x the dense bf16 folder's. Logits against the masked bf16 export: "
            f"{same}.\n\n" + sizes + "\n" + loads)


def render_families(data: dict) -> str:
    """bench/families.py: how many types of each mapping have each status, then every type's verdict."""
    p = data["protocol"]
    line = (f"Protocol: every causal-LM and image-text-to-text model type of transformers {p['transformers']} "
            f"({p['types']} types), built tiny and random from its config (hidden 64, one layer of each kind of its "
            f"stack, `bench/tiny_types.py`), then `{p['prune']}`, `permsparse check`, reloaded with plain "
            "transformers and every matrix inside the blocks counted; one process per type, "
            f"{p['jobs']} at a time, killed after {p['timeout_s']:.0f} s; {p['wall_s']:.0f} s wall in all. "
            "Pruned: matrices at least half zero / matrices the record names as pruned; dense: the other matrices "
            "inside the blocks.\n\n")
    statuses = list(next(iter(p["counts"].values())))
    counts = table(["mapping", *statuses], [[m, *(str(c[s]) for s in statuses)] for m, c in p["counts"].items()])

    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = [[r["model_type"], r["mapping"], r["status"], str(r["layers"] or "–"), cell(r["kinds"]) or "–",
             f"{r['half_zero']} / {r['pruned']}" if r["pruned"] else "–", cell(", ".join(r["dense"])) or "–",
             cell(r["message"].removeprefix("permsparse: error: "))[:220] or "–"] for r in data["results"]]
    return (header(data) + line + counts + "\n"
            + table(["type", "mapping", "status", "blocks", "kinds", "pruned", "dense", "message"], rows))


RENDERERS = {"families": render_families, "compressed": render_compressed, "demo": render_demo, "quant": render_quant, "quant_learned": render_quant, "vlm": render_vlm, "encoder": render_encoder, "vision": render_vision, "zeroshot_300": render_zeroshot_paired,
             "permutation": render_permutation, "learned_cost": render_learned_cost, "gpu_speed": render_gpu_speed,
             "update_cost": render_update_cost, "search_speed": render_search_speed, "testbed_recipes": render_testbed_recipes, "gpu_check": render_gpu_check}


def renderer(name: str, data: dict):
    """The renderer of ``NAME.json``: its own entry, else the one of the script that wrote it (for
    ``bench/oneshot.py``, the seeds summary when the run has several seeds)."""
    if name in RENDERERS:
        return RENDERERS[name]
    command = data.get("command", "")
    if command.startswith("python3 bench/learned.py"):
        return render_learned
    if command.startswith("python3 bench/encoder.py"):
        return render_encoder
    if command.startswith("python3 bench/oneshot.py"):
        return render_oneshot_seeds if len(data["protocol"].get("seeds") or []) > 1 else render_oneshot
    return None


def regenerate(text: str) -> str:
    for name in dict.fromkeys(re.findall(r"<!-- table:(\w+) -->", text)):
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text())
        render = renderer(name, data)
        if render is None:
            continue
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
        body = render(data)
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true",
                        help="rewrite nothing; exit 1 if README.md or docs/results.md is not up to date")
    args = parser.parse_args()
    stale = []
    for path in DOCUMENTS:
        text = path.read_text()
        new = regenerate(text)
        if new == text:
            continue
        stale.append(path.relative_to(ROOT))
        if not args.check:
            path.write_text(new)
    if args.check:
        for path in stale:
            print(f"{path}: tables out of date, run python3 bench/tables.py", file=sys.stderr)
        return 1 if stale else 0
    names = ", ".join(str(path.relative_to(ROOT)) for path in DOCUMENTS)
    print(f"tables of {names} regenerated from {RESULTS} ({len(stale)} file(s) changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
