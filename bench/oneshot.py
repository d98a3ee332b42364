"""One-shot pruning of SmolLM2-135M: dense, unstructured 50% and 2:4 with each score, side by side.

Protocol: WikiText-2 raw test, non-overlapping windows of --seqlen (first --windows of them, and all
with --full); calibration --nsamples random windows of --seqlen from WikiText-2 valid, seed --seed.
"""
from __future__ import annotations

import argparse

from common import add_protocol_args, print_table, run_rows, save_json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_protocol_args(parser)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--perms", nargs="*", default=[], help="add 2:4 Wanda rows with these permutation methods")
    parser.add_argument("--binding", default="per-linear", help="binding of the permutation rows")
    args = parser.parse_args()
    calib = dict(calib="wikitext2-valid", nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed)
    rows = [
        {"label": "dense", "config": None},
        {"label": "unstructured 50% (wanda)", "config": dict(pattern="50%", score="wanda", **calib)},
        {"label": "2:4 magnitude", "config": dict(pattern="2:4", score="magnitude", **calib)},
        {"label": "2:4 wanda", "config": dict(pattern="2:4", score="wanda", **calib)},
        {"label": "2:4 ria", "config": dict(pattern="2:4", score="ria", **calib)},
    ]
    rows += [{"label": f"2:4 wanda + {perm} ({args.binding})",
              "config": dict(pattern="2:4", score="wanda", perm=perm, binding=args.binding, **calib)}
             for perm in args.perms]
    protocol = {**vars(args), "eval": "wikitext2 raw test", "calib": "wikitext2-valid"}
    print(f"one-shot pruning of {args.model}: eval WikiText-2 raw test, seqlen {args.seqlen}, first "
          f"{args.windows} windows{' and all' if args.full else ''}; calibration {args.nsamples} x {args.seqlen} "
          f"tokens of WikiText-2 valid, seed {args.seed}")
    results = run_rows(args.model, rows, seqlen=args.seqlen, windows=args.windows, full=args.full, threads=args.threads, jobs=args.jobs)
    print_table(results, [("label", "method", ""), ("ppl", f"ppl@{args.windows}x{args.seqlen}", ".2f"),
                          ("ppl_full", "ppl full", ".2f"), ("prune_s", "prune s", ".1f"),
                          ("peak_rss_mb", "peak MB", ".0f")])
    print(f"saved {save_json('oneshot', protocol, results)}")


if __name__ == "__main__":
    main()
