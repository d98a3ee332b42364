"""The demo (``make demo``): SmolLM2-135M pruned to 2:4 with Wanda, without a permutation, with RIA's
and with the learned one, each with the tool's default configuration, side by side.

Protocol: every row calibrates as ``permsparse prune`` does by default; evaluation on the first
``--windows`` windows of ``--seqlen`` tokens of WikiText-2 test and of Tiny Shakespeare (neither is
calibration text). Two rows run at once (the learned one beside the two others), one thread each.
"""
from __future__ import annotations

import argparse
import time

from common import Row, add_protocol_args, ppl_columns, print_table, protocol_from, run_rows, save_json

from permsparse import Learned, PruneConfig, Search


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_protocol_args(parser)
    parser.set_defaults(jobs=2)
    args = parser.parse_args()
    protocol = protocol_from(args)
    rows = [Row("learned (default)", PruneConfig(permutation=Learned())),
            Row("none", PruneConfig()), Row("ria", PruneConfig(permutation=Search("ria"))),
            Row("dense", None)]
    print(f"{args.model}, 2:4 Wanda, default calibration ({PruneConfig().calibration.source}); evaluation: first "
          f"{args.windows} windows of {args.seqlen} tokens of {', '.join(args.evals)}", flush=True)
    started = time.perf_counter()
    results = run_rows(rows, protocol, args.jobs, args.rows, partial="demo")
    order = {row.label: i for i, row in enumerate([rows[3], rows[1], rows[2], rows[0]])}
    results.sort(key=lambda r: order[r["label"]])
    print_table(results, [("label", "2:4 Wanda + permutation", "")] + ppl_columns(protocol, gap=False)
                + [("prune_s", "pruning s", ".0f"), ("peak_rss_mb", "peak MB", ".0f")])
    print(f"{time.perf_counter() - started:.0f} s in all; saved {save_json('demo', vars(args), results)}")


if __name__ == "__main__":
    main()
