"""The learned permutation across domains: calibration source x evaluation text, against every search.

For each calibration source (``--calibs``) the rows are: 2:4 Wanda without a permutation, unstructured
50% Wanda (the reference limit), ria and output searches, and the learned variants (``--variants``:
objectives, warm starts, schedules, calibration sizes). Every row is evaluated on the first ``--windows``
windows of ``--seqlen`` tokens of each text of ``--evals``; gap closed per cell is (ppl of none - ppl) /
(ppl of none - ppl of unstructured 50%) within the same calibration source. The validation text
(``--validation``, Alpaca by default: neither a calibration source here nor a reported evaluation) is
the one defaults and hyper-parameters are chosen on; the others only report.

With several ``--seeds`` every row runs once per seed (the seed draws the calibration and held-out
windows and seeds the learner), gap closed is taken within each seed, and a summary gives each method's
mean and standard deviation over the seeds, and its gap closed minus RIA's paired by seed: the spread
that a single-seed table hides. With ``--tasks``, every row's zero-shot accuracy is compared with RIA's
item by item.
"""
from __future__ import annotations

import argparse

from common import (EVAL_NAMES, Row, add_protocol_args, calib_label, gap_closed_by_seed, ppl_columns, print_paired,
                    print_seeds, print_table, protocol_from, run_rows, save_json, seed_suffixes)

from permsparse import Calibration, Learned, PruneConfig, Search

# name -> (Learned fields, Calibration fields) changed from the defaults; every variant names its start
KL_HIDDEN = {"init": "ria", "ce": 0.0, "kl": 1.0, "hidden": 1.0}  # the distillation objective from RIA
VARIANTS = {
    "default": ({}, {}),
    "ce+hidden, ria start": ({"init": "ria", "ce": 1.0, "kl": 0.0, "hidden": 1.0}, {}),
    "ce+hidden, output start": ({"init": "output", "ce": 1.0, "kl": 0.0, "hidden": 1.0}, {}),
    "ce, ria start": ({"init": "ria", "ce": 1.0, "kl": 0.0, "hidden": 0.0}, {}),
    "hidden, ria start": ({"init": "ria", "ce": 0.0, "kl": 0.0, "hidden": 1.0}, {}),
    "kl, ria start": ({"init": "ria", "ce": 0.0, "kl": 1.0, "hidden": 0.0}, {}),
    "kl+hidden, ria start": (KL_HIDDEN, {}),
    "kl+hidden, output start": ({"init": "output", "ce": 0.0, "kl": 1.0, "hidden": 1.0}, {}),
    "kl+hidden, ria start, 128 windows": (KL_HIDDEN, {"nsamples": 128}),
    "kl+hidden, ria start, 60 steps": ({**KL_HIDDEN, "steps": 60}, {}),
    "blockwise, ria start": ({"init": "ria", "scope": "blockwise"}, {}),
    "kl+hidden, ria start, 20 steps of 1": ({**KL_HIDDEN, "steps": 20, "batch": 1}, {}),
    "kl+hidden, ria start, 20 steps of 4": ({**KL_HIDDEN, "steps": 20, "batch": 4}, {}),
    "kl, ria start, 20 steps of 4": ({"init": "ria", "ce": 0.0, "kl": 1.0, "hidden": 0.0, "steps": 20, "batch": 4}, {}),
    "kl+hidden, ria start, 40 steps of 4": ({**KL_HIDDEN, "steps": 40, "batch": 4}, {}),
    "kl+hidden, ria start, 20 steps of 4, 128 windows": ({**KL_HIDDEN, "steps": 20, "batch": 4}, {"nsamples": 128}),
    "kl+hidden, ria start, 20 steps of 4, tiles of 192": ({**KL_HIDDEN, "steps": 20, "batch": 4, "tile": 192}, {}),
    "kl+hidden, ria start, 20 steps of 4, tiles up to 512": ({**KL_HIDDEN, "steps": 20, "batch": 4, "tile": 512}, {}),
    "ce+hidden, ria start, 20 steps of 1": ({"init": "ria", "ce": 1.0, "kl": 0.0, "hidden": 1.0, "steps": 20,
                                             "batch": 1}, {}),
}


def rows_for(calib: str, args, seed: int, suffix: str = "") -> list[Row]:
    base = Calibration(source=calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=seed,
                       temperature=args.sample_temperature)
    label = calib_label(calib, args.sample_temperature)
    baselines = {"none": PruneConfig(calibration=base), "unstructured 50%": PruneConfig(pattern="50%", calibration=base),
                 "ria": PruneConfig(permutation=Search("ria"), calibration=base),
                 "output": PruneConfig(permutation=Search("output"), calibration=base)}
    rows = [Row(f"{label} | {name}{suffix}", baselines[name]) for name in args.baselines]
    for name in args.variants:
        learned, calibration = VARIANTS[name]
        config = PruneConfig(permutation=Learned(**learned),
                             calibration=Calibration(**{**vars(base), **calibration}))
        rows.append(Row(f"{label} | learned {name}{suffix}", config))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_protocol_args(parser, evals=("wikitext2", "shakespeare", "alpaca"), seeds=True, reuse=True)
    parser.add_argument("--calibs", nargs="+", default=["c4", "wikitext2-valid"], help="calibration sources")
    parser.add_argument("--variants", nargs="*", default=["default"], choices=sorted(VARIANTS))
    parser.add_argument("--baselines", nargs="*", default=["none", "unstructured 50%", "ria", "output"],
                        help="baseline rows of each calibration source")
    parser.add_argument("--sample-temperature", type=float, default=1.0,
                        help="temperature at which --calibs self samples its text")
    parser.add_argument("--validation", default="alpaca", help="the evaluation text defaults are chosen on")
    parser.add_argument("--save-as", default="learned", help="name of the JSON file under bench/results")
    args = parser.parse_args()
    protocol = protocol_from(args)
    suffixes = seed_suffixes(args)
    seeds = list(suffixes)
    rows = [row for calib in args.calibs for s in seeds for row in rows_for(calib, args, s, suffixes[s])]
    print(f"learned permutation across domains on {args.model}, 2:4 Wanda: calibration {args.nsamples} x {args.seqlen} "
          f"of {', '.join(args.calibs)}; evaluation first {args.windows} windows of {args.seqlen} of "
          f"{', '.join(EVAL_NAMES.get(t, t) for t in args.evals)} (validation: {args.validation})", flush=True)
    results = run_rows(rows, protocol, args.jobs, args.rows, partial=args.save_as, reuse=args.reuse)
    for calib in (calib_label(c, args.sample_temperature) for c in args.calibs):
        group = [r for r in results if r["label"].startswith(f"{calib} | ")]
        gap_closed_by_seed(group, f"{calib} | none", f"{calib} | unstructured 50%")
        print(f"\ncalibration: {calib}")
        print_table(group, [("label", "method", "")] + ppl_columns(protocol)
                    + [("prune_s", "prune s", ".0f"), ("peak_rss_mb", "peak MB", ".0f")])
        if len(seeds) > 1:
            print_seeds(group, f"{calib} | ria")
        if protocol.tasks:
            print("zero-shot accuracy against ria of the same seed on the same items (points, ± paired standard error):")
            for s, suffix in suffixes.items():
                print_paired([r for r in group if r["label"].endswith(suffix)], [f"{calib} | ria{suffix}"])
    print(f"saved {save_json(args.save_as, vars(args), results)}")


if __name__ == "__main__":
    main()
