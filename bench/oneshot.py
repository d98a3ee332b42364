"""One-shot pruning of SmolLM2-135M: every host score and every permutation method, side by side.

Rows: dense; unstructured 50% Wanda (the reference limit); 2:4 with the magnitude, Wanda and RIA hosts;
2:4 Wanda with each permutation (cp, ria, output, learned), per-linear binding; the hosts that update
the kept weights (SparseGPT, ADMM) without a permutation, with RIA's (each choosing its own mask inside
the permuted groups) and with the learned one, followed by a reconstruction with its mask fixed or by the
host choosing its own mask inside the learned groups; and with ``--distill-steps`` above 0, the rows
unstructured 50%, 2:4 Wanda, + ria, + learned and ADMM + ria again followed by the distillation of their
kept weights (the library's defaults but the step count). The learned permutation is the library's
default but for ``--learned-batch`` windows per step. Every row uses the
tool's default calibration (``--calib``, ``--nsamples`` x ``--seqlen``, seed ``--seed``); evaluation on
the first ``--windows`` windows of ``--seqlen`` tokens of each ``--evals`` text. Gap closed per text:
(ppl of 2:4 Wanda - ppl) / (ppl of 2:4 Wanda - ppl of unstructured 50%). With several ``--seeds``
every row runs once per seed, gap closed is taken within each seed, and a summary gives each method's
mean ± sd over the seeds and its gap closed minus each ``--versus`` row's, paired seed by seed.
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from common import (Row, add_protocol_args, gap_closed_by_seed, ppl_columns, print_paired, print_seeds, print_table,
                    protocol_from, run_rows, save_json, seed_suffixes)

from permsparse import Calibration, Distill, Learned, PruneConfig, Search


DISTILLED = ("unstructured 50% (wanda)", "2:4 wanda", "2:4 wanda + ria", "2:4 wanda + learned", "2:4 admm + ria",
             "2:4 admm")


def rows_for(args, seed: int, suffix: str) -> list[Row]:
    """Every row of the benchmark, calibrated with ``seed``, labels ending in ``suffix``."""
    calib = Calibration(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed)
    base = dict(calibration=calib)
    learned = Learned(batch=args.learned_batch)
    rows = [Row("dense", None),
            Row("unstructured 50% (wanda)", PruneConfig(pattern="50%", **base)),
            Row("2:4 magnitude", PruneConfig(score="magnitude", **base)),
            Row("2:4 wanda", PruneConfig(**base)),
            Row("2:4 ria", PruneConfig(score="ria", **base))]
    for label, permutation in [("cp", Search("cp")), ("ria", Search("ria")), ("output", Search("output")),
                               ("learned", learned)]:
        rows.append(Row(f"2:4 wanda + {label}", PruneConfig(permutation=permutation, binding=args.binding, **base)))
    for host in ("sparsegpt", "admm"):
        rows += [Row(f"2:4 {host}", PruneConfig(score=host, **base)),
                 Row(f"2:4 {host} + ria", PruneConfig(score=host, permutation=Search("ria"), binding=args.binding, **base)),
                 Row(f"2:4 {host} + learned (reconstruct)", PruneConfig(score=host, update_mask="permutation",
                                                                       permutation=learned, binding=args.binding,
                                                                       **base)),
                 Row(f"2:4 {host} + learned (own mask)", PruneConfig(score=host, permutation=learned,
                                                                    binding=args.binding, **base))]
    if args.distill_steps:
        distilled = {row.label: row.config for row in rows if row.label in DISTILLED}
        every = {"judge_every": args.distill_judge_every} if args.distill_judge_every else {}
        rows += [Row(f"{label} + distill", replace(config, distill=Distill(steps=args.distill_steps, **every)))
                 for label, config in distilled.items()]
        rows += [Row(f"{label} + distill ({masks})", replace(config, distill=Distill(steps=args.distill_steps,
                                                                                     masks=masks, **every)))
                 for masks in args.distill_masks for label, config in distilled.items()
                 if config.nm is not None or masks == "dynamic"]
    return [Row(row.label + suffix, row.config) for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_protocol_args(parser, seeds=True, reuse=True)
    parser.add_argument("--calib", default=Calibration().source, help="calibration source of every row")
    parser.add_argument("--binding", default="per-linear", help="binding of the permutation rows")
    parser.add_argument("--versus", nargs="*", default=["2:4 wanda", "2:4 wanda + ria"],
                        help="rows every other row is compared with: zero-shot accuracy item by item, and gap "
                             "closed seed by seed (--seeds)")
    parser.add_argument("--learned-batch", type=int, default=Learned().batch,
                        help="windows per training step of every learned permutation (0: the library's default)")
    parser.add_argument("--distill-steps", type=int, default=0,
                        help="also the rows of DISTILLED followed by this many steps of distillation of their kept weights")
    parser.add_argument("--distill-judge-every", type=int, default=0,
                        help="steps between the distillation's judgments (0: the library's default); with "
                             "--distill-masks alternate, the length of its phases")
    parser.add_argument("--distill-masks", nargs="*", default=[], choices=["dynamic", "joint", "alternate"],
                        help="also the distilled rows with masks that follow the weights this way (--distill-masks)")
    parser.add_argument("--save-as", default="oneshot", help="name of the JSON file under bench/results")
    args = parser.parse_args()
    protocol = protocol_from(args)
    suffixes = seed_suffixes(args)
    seeds = list(suffixes)
    rows = [row for s in seeds for row in rows_for(args, s, suffixes[s])]
    print(f"one-shot pruning of {args.model}: calibration {args.nsamples} x {args.seqlen} tokens of {args.calib}, "
          f"seed {', '.join(map(str, seeds))}; evaluation: first {args.windows} windows of {args.seqlen} tokens of "
          f"{', '.join(args.evals)}", flush=True)
    results = run_rows(rows, protocol, args.jobs, args.rows, partial=args.save_as, reuse=args.reuse)
    gap_closed_by_seed(results, "2:4 wanda", "unstructured 50% (wanda)")
    print_table(results, [("label", "method", "")] + ppl_columns(protocol)
                + [("prune_s", "prune s", ".0f"), ("peak_rss_mb", "peak MB", ".0f")])
    if len(seeds) > 1:
        for ref in args.versus:
            print_seeds(results, ref)
    if protocol.tasks:
        print("\nzero-shot accuracy, paired differences on the same items (points, ± standard error):")
        print_paired(results, args.versus)
    print(f"saved {save_json(args.save_as, vars(args), results)}")


if __name__ == "__main__":
    main()
