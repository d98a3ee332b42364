"""Permutation searches on SmolLM2-135M: layer-level quality and cost, then the pruned model's perplexity.

Part 1 (layers): every target linear, Wanda scores and Gram matrices from the dense model on the
calibration windows; per method the efficacy (retained Wanda score, docs/method.md), the output error
``sum_r d_r H d_r^T`` relative to no permutation and the share of the gap to unstructured 50% it closes,
and the search seconds. Part 2 (model): 2:4 Wanda pruned with each method, WikiText-2 perplexity, in the
same run. Part 3: search time on synthetic 4096- and 11008-wide matrices, to project a 7B model.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from common import Row, add_protocol_args, print_table, protocol_from, run_rows, save_json

LLAMA2_7B = {"4096": 32 * 6, "11008": 32 * 1}  # per-linear sites of each input width (q,k,v,o,gate,up | down)


@torch.no_grad()
def layer_table(model_name: str, methods: list[str], calib: str, nsamples: int, seqlen: int, seed: int,
                blocks: list[int] | None) -> list[dict]:
    from permsparse.data import text as data
    from permsparse import efficacy, find_permutation, load_model
    from permsparse.discover.adapters import adapter_for, linear_weight
    from permsparse.sparsity.statistics import capture_block_inputs, collect_input_stats
    from permsparse.sparsity.masks import unstructured_mask
    from permsparse.permute.metrics import output_error
    from permsparse.sparsity.scores import wanda

    model, tokenizer = load_model(model_name)
    adapter = adapter_for(model)
    samples, _ = data.calibration_windows(data.calibration_stream(tokenizer, calib), nsamples, seqlen, seed)
    inputs, kwargs = capture_block_inputs(model, adapter, samples)
    rows = {m: {"label": m, "efficacy": [], "err_vs_none": [], "gap_closed": [], "search_s": 0.0} for m in methods}
    for i, block in enumerate(adapter.blocks(model)):
        readers = {g[0]: g[0] for g in adapter.input_groups}
        stats, inputs = collect_input_stats(block, readers, inputs, kwargs, True, f"block {i}")
        if blocks is not None and i not in blocks:
            continue
        for group in adapter.input_groups:
            s = stats[group[0]]
            for name in group:
                weight = linear_weight(block.get_submodule(name)).float()
                scores = wanda(weight, s.act_norm)
                identity = torch.arange(weight.shape[1])
                err_none = output_error(weight, s.gram, identity, 2, 4, scores)
                dropped = weight * ~unstructured_mask(scores, 0.5)
                err_unstructured = float(((dropped @ s.gram) * dropped).sum())
                for method in methods:
                    start = time.perf_counter()
                    p = find_permutation(scores, 2, 4, method, weight=weight, gram=s.gram, seed=seed)
                    rows[method]["search_s"] += time.perf_counter() - start
                    err = output_error(weight, s.gram, p, 2, 4, scores)
                    rows[method]["efficacy"].append(efficacy(scores, p, 2, 4))
                    rows[method]["err_vs_none"].append(err / err_none)
                    rows[method]["gap_closed"].append((err_none - err) / max(err_none - err_unstructured, 1e-30))
        print(f"  layers of block {i} done", flush=True)
    out = []
    for r in rows.values():
        count = len(r["efficacy"])
        row = {"label": r["label"], "linears": count, "efficacy": sum(r["efficacy"]) / count,
               "err_vs_none": sum(r["err_vs_none"]) / count, "gap_closed": sum(r["gap_closed"]) / count,
               "search_s": r["search_s"]}
        if "ria" in rows:  # the yardstick: share of ria's remaining gap to unstructured, per layer
            ria = rows["ria"]["gap_closed"]
            row["of_ria_gap"] = sum((g - b) / max(1 - b, 1e-30) for g, b in zip(r["gap_closed"], ria)) / count
        out.append(row)
    return out


def chunks_for(cols: int, chunk: int, m: int = 4) -> int:
    """Fewest equal chunks (``--chunks``), each a multiple of ``m`` and at most ``chunk`` channels wide."""
    return next(g for g in range(1, cols + 1) if cols % g == 0 and cols // g <= chunk and (cols // g) % m == 0)


@torch.no_grad()
def synthetic_timing(methods: list[str], seed: int, chunk: int) -> list[dict]:
    """Search seconds for one linear of each 7B width (rows 4096), and the projected 7B total.

    Channels are cut into chunks of at most ``chunk`` (``find_permutation(chunks=...)``): every search
    costs about ``width^2 * rows`` per round unchunked, which at 11008 channels is minutes per round.
    """
    from permsparse import efficacy, find_permutation
    from permsparse.sparsity.scores import wanda

    gen = torch.Generator().manual_seed(seed)
    results = []
    for method in methods:
        row = {"label": method}
        total = 0.0
        for width, count in LLAMA2_7B.items():
            cols = int(width)
            weight = torch.randn(4096, cols, generator=gen)
            x = torch.randn(1024, cols, generator=gen) * torch.rand(cols, generator=gen).pow(4)
            gram = x.T @ x
            scores = wanda(weight, gram.diagonal().sqrt())
            chunks = chunks_for(cols, chunk)
            start = time.perf_counter()
            p = find_permutation(scores, 2, 4, method, weight=weight, gram=gram, chunks=chunks, seed=seed)
            row[f"s_{width}"] = time.perf_counter() - start
            row[f"chunks_{width}"] = chunks
            row[f"efficacy_{width}"] = efficacy(scores, p, 2, 4)
            total += row[f"s_{width}"] * count
        row["projected_7b_h"] = total / 3600
        print(f"  synthetic {method}: {row}", flush=True)
        results.append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_protocol_args(parser, evals=("wikitext2",))
    parser.add_argument("--calib", default="wikitext2-valid", help="calibration source")
    parser.add_argument("--methods", nargs="+", default=["none", "cp", "ria", "output"])
    parser.add_argument("--blocks", type=int, nargs="*", default=None, help="layer part: only these blocks")
    parser.add_argument("--skip", nargs="*", default=[], choices=["layers", "model", "synthetic"])
    parser.add_argument("--bindings", nargs="+", default=["per-linear", "shared"])
    parser.add_argument("--propagate", default="pruned", choices=["pruned", "dense"],
                        help="model part: statistics of each block from the pruned (default) or dense model")
    parser.add_argument("--chunk", type=int, default=1024, help="synthetic part: widest chunk of channels searched as one")
    parser.add_argument("--part-threads", type=int, default=os.cpu_count(),
                        help="torch threads of the layer and synthetic parts (model rows use --threads each)")
    parser.add_argument("--save-as", default="permutation", help="name of the JSON file under bench/results")
    args = parser.parse_args()
    torch.set_num_threads(args.part_threads)
    protocol = {**vars(args), "score": "wanda", "pattern": "2:4"}
    print(f"permutation searches on {args.model}, 2:4, Wanda host; calibration {args.nsamples} x {args.seqlen} tokens "
          f"of {args.calib}, seed {args.seed}; eval {', '.join(args.evals)}, seqlen {args.seqlen}, first {args.windows} "
          f"windows; {args.part_threads} torch threads for the layer and synthetic parts")
    results = {}
    if "layers" not in args.skip:
        print("part 1: every target linear (dense-model statistics)")
        results["layers"] = layer_table(args.model, args.methods, args.calib, args.nsamples, args.seqlen, args.seed,
                                        args.blocks)
        print_table(results["layers"], [("label", "method", ""), ("linears", "linears", "d"), ("efficacy", "efficacy", ".3f"),
                                        ("err_vs_none", "error/none", ".3f"), ("gap_closed", "gap closed", ".3f"),
                                        ("of_ria_gap", "of ria's gap", ".3f"),
                                        ("search_s", "search s", ".1f")])
    if "model" not in args.skip:
        print(f"part 2: perplexity of the 2:4 Wanda model per method and binding ({args.propagate}-model statistics)")
        from permsparse import Calibration, PruneConfig, Search

        calib = Calibration(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                            propagate=args.propagate)
        rows = [Row("none", PruneConfig(calibration=calib))]
        rows += [Row(f"{m} ({b})", PruneConfig(permutation=Search(m), binding=b, calibration=calib))
                 for b in args.bindings for m in args.methods if m != "none"]
        results["model"] = run_rows(rows, protocol_from(args), args.jobs, args.rows)
        print_table(results["model"], [("label", "method", "")]
                    + [(f"ppl.{t}", f"{t} ppl", ".2f") for t in args.evals]
                    + [("prune_s", "prune s", ".1f"), ("peak_rss_mb", "peak MB", ".0f")])
    if "synthetic" not in args.skip:
        print("part 3: one linear of each LLaMA-2-7B width (4096 rows), projected over the 7B model's 224 linears "
              "(per-linear binding)")
        results["synthetic"] = synthetic_timing([m for m in args.methods if m != "none"], args.seed, args.chunk)
        print_table(results["synthetic"], [("label", "method", ""), ("s_4096", "s @4096", ".1f"),
                                           ("efficacy_4096", "eff @4096", ".3f"), ("s_11008", "s @11008", ".1f"),
                                           ("efficacy_11008", "eff @11008", ".3f"),
                                           ("projected_7b_h", f"7B h ({args.part_threads} threads)", ".2f")])
    print(f"saved {save_json(args.save_as, protocol, [results])}")


if __name__ == "__main__":
    main()
