"""The learned permutation against every search on SmolLM2-135M, 2:4, one run; ablations by option.

Gap closed = (ppl_none - ppl_method) / (ppl_none - ppl_unstructured50), all with the same host score and
calibration. Protocol as bench/oneshot.py (WikiText-2 raw test windows of --seqlen; WikiText-2 valid
calibration). Ablations change one thing of the learned row of ``--ablation-mode`` (e2e by default).
"""
from __future__ import annotations

import argparse

from common import add_protocol_args, print_table, run_rows, save_json

from permsparse import PruneConfig

ABLATIONS = {
    # a warm start is refined within blocks of learn_block channels: G = width / learn_block blocks per site
    "block": [("block 32", {"learn_block": 32}), ("block 64", {"learn_block": 64}), ("block 192", {"learn_block": 192})],
    # a random start learns over width / G channels per block (learn_block only applies to warm starts)
    "groups": [("random, G=4", {"learn_init": "random", "perm_groups": 4}),
               ("random, G=16", {"learn_init": "random", "perm_groups": 16})],
    "loss": [("loss mse", {"learn_loss": "mse"}), ("loss smoothl1", {"learn_loss": "smoothl1"}),
             ("loss cosine", {"learn_loss": "cosine"})],
    "mode": [("soft", {"learn": {"mode": "soft"}})],  # against the default straight-through (ste)
    "init": [("warm (output)", {"learn_init": "output"}), ("random init", {"learn_init": "random"})],
    "host": [("host ria", {"score": "ria"}), ("host magnitude", {"score": "magnitude"})],
    # calibration text of the e2e row: in-domain WikiText-2 valid (default) or Shakespeare (out of domain)
    "calib": [("calib shakespeare", {"calib": "shakespeare"})],
    # e2e objective: CE + alpha * distillation (default alpha 1), CE alone, distillation alone
    "objective": [("CE only", {"learn_mode": "e2e", "learn_alpha": 0.0}),
                  ("distill only", {"learn_mode": "e2e", "learn_ce": False})],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_protocol_args(parser)
    parser.add_argument("--binding", default="per-linear")
    parser.add_argument("--steps", type=int, default=None, help="training steps per block (default: LearnConfig's)")
    parser.add_argument("--ablations", nargs="*", default=[], choices=sorted(ABLATIONS))
    parser.add_argument("--ablation-mode", default="e2e", choices=["e2e", "blockwise"],
                        help="the learned row the ablations change")
    parser.add_argument("--rows", nargs="*", default=None,
                        help="run only the rows with these labels (e.g. 'learned blockwise' 'learned, soft'); default all")
    parser.add_argument("--calib", default="wikitext2-valid", help="calibration text of every row")
    parser.add_argument("--save-as", default="learned", help="name of the JSON file under bench/results")
    args = parser.parse_args()
    base = dict(pattern="2:4", score="wanda", calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                seed=args.seed, binding=args.binding)
    learn = {"steps": args.steps} if args.steps else {}
    rows = [{"label": "dense", "config": None},
            {"label": "unstructured 50%", "config": {**base, "pattern": "50%", "binding": "per-linear"}}]
    rows += [{"label": perm, "config": {**base, "perm": perm}} for perm in ("none", "cp", "ria", "output")]
    rows += [{"label": "ria (dense statistics)", "config": {**base, "perm": "ria", "propagate": "dense"}},
             {"label": "unstructured 50% (dense statistics)",
              "config": {**base, "pattern": "50%", "binding": "per-linear", "propagate": "dense"}},
             {"label": "learned blockwise (dense statistics)",
              "config": {**base, "perm": "learned", "learn_mode": "blockwise", "learn": learn, "propagate": "dense"}}]
    rows += [{"label": "learned blockwise", "config": {**base, "perm": "learned", "learn_mode": "blockwise",
                                                       "learn": learn}},
             {"label": "learned e2e", "config": {**base, "perm": "learned", "learn_mode": "e2e", "learn": learn}}]
    default = {**base, "perm": "learned", "learn_mode": args.ablation_mode, "learn": learn}
    for name in args.ablations:
        for label, change in ABLATIONS[name]:
            config = {**default, **change}
            config["learn"] = {**learn, **change.get("learn", {})}
            same = PruneConfig(**config) == PruneConfig(**default)
            if same and any(r["label"] == f"learned {args.ablation_mode}" for r in rows):
                continue  # the main table's learned row already is this ablation's default
            rows.append({"label": f"learned {config['learn_mode']}, {label}" + (" (default)" if same else ""),
                         "config": config})
    if args.rows is not None:
        rows = [r for r in rows if r["label"] in args.rows]
    print(f"learned permutation on {args.model}: 2:4, binding {args.binding}; eval WikiText-2 raw test, seqlen "
          f"{args.seqlen}, first {args.windows} windows; calibration {args.nsamples} x {args.seqlen} of {args.calib}")
    results = run_rows(args.model, rows, seqlen=args.seqlen, windows=args.windows, full=args.full, jobs=args.jobs)
    by_label = {r["label"]: r["ppl"] for r in results}
    if "none" in by_label and "unstructured 50%" in by_label:
        span = by_label["none"] - by_label["unstructured 50%"]
        for r in results:
            r["gap_closed"] = (by_label["none"] - r["ppl"]) / span if r["label"] != "dense" else None
    print_table(results, [("label", "method", ""), ("ppl", f"ppl@{args.windows}x{args.seqlen}", ".2f"),
                          ("ppl_full", "ppl full", ".2f"), ("gap_closed", "gap closed", ".3f"),
                          ("prune_s", "prune s", ".0f"), ("peak_rss_mb", "peak MB", ".0f")])
    print(f"saved {save_json(args.save_as, vars(args), results)}")


if __name__ == "__main__":
    main()
