"""Vision Transformers: the seed paper's first table on image classification, with the CIFAR-10 ViT testbed.

Rows: dense; unstructured 50% Wanda (the reference limit); 2:4 and 4:8 Wanda with each permutation
(none, cp, ria, output, learned), ``--binding`` (per-linear by default). Every row calibrates on
``--nsamples`` seeded images of the CIFAR-10 training split (``--calib``); the learned rows start from
the output search (``--init``), train on the labels' cross-entropy plus every block's distillation, and
are judged on ``--holdout`` more; every row is evaluated on the CIFAR-10 test split (``--limit`` images,
a seeded draw, if given): top-1 and top-5. ``--eval validation`` evaluates instead on training images
that no row calibrates or judges on (``--limit`` of them, 5,000 by default): the split on which this
benchmark's settings (``--nsamples``, ``--steps``, ``--init``) are chosen, the test split only
reporting. The defaults (512 calibration images, 300 steps from the output search) win there against
128 images, 100 steps and the ria start (``bench/results/vision_val_*.json``). The patch embedding and
the classifier stay dense. Gap closed per pattern, on top-1: (top-1 - top-1 of the pattern without
permutation) / (top-1 of unstructured 50% - the same), and the same towards the dense model's top-1 (the
seed paper's measure).

Each row runs in its own process (its peak memory its own); the testbed is built first, once, in this
process (``--model cifar10-vit``, under an hour on 2 cores). Results: ``bench/results/vision.json``.
"""
from __future__ import annotations

import argparse
import time

from common import Row, add_row_args, print_table, run_spawned, save_json

from permsparse import Calibration, Learned, PruneConfig, Search

PATTERNS = ("2:4", "4:8")
METHODS = ("none", "cp", "ria", "output", "learned")
LIMIT_ROW = "unstructured 50% (wanda)"


def rows_for(args) -> list[Row]:
    calib = Calibration(source=args.calib, nsamples=args.nsamples, seed=args.seed, holdout=args.holdout,
                        batch_size=args.batch_size)
    rows = [Row("dense", None), Row(LIMIT_ROW, PruneConfig(pattern="50%", calibration=calib))]
    for pattern in PATTERNS:
        for method in METHODS:
            permutation = (Learned(init=args.init, ce=1.0, kl=0.0, hidden=1.0, steps=args.steps, batch=args.learn_batch,
                                   judge_every=args.judge_every)
                           if method == "learned" else Search(method))
            rows.append(Row(f"{pattern} wanda + {method}", PruneConfig(pattern=pattern, permutation=permutation,
                                                                      binding=args.binding, calibration=calib)))
    return rows


def run_row(row: Row, args) -> dict:
    import torch

    from permsparse import load_model, prune
    from permsparse.data.images import accuracy
    from permsparse.report import peak_rss_mb
    from permsparse.serial import to_dict

    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model)
    result = {"label": row.label, "prune_s": 0.0, "config": None if row.config is None else to_dict(row.config)}
    if row.config is not None:
        report = prune(model, processor, row.config, progress=False)
        result.update(prune_s=report.seconds, training=to_dict(report.training))
    started = time.perf_counter()
    if args.eval == "validation":
        from permsparse.data.images import calibration_index, image_count

        used = calibration_index(image_count(args.calib), args.nsamples, args.holdout, args.seed)
        scored = accuracy(model, processor, args.calib, limit=args.limit or 5000, exclude=used, progress=False)
    else:
        scored = accuracy(model, processor, "cifar10-test", limit=args.limit, progress=False)
    result.update(top1=scored.top1, top5=scored.top5, images=scored.images, eval_s=time.perf_counter() - started,
                  peak_rss_mb=peak_rss_mb())
    return result


def describe(r: dict) -> str:
    """A finished row, as the console shows it."""
    return f"{r['label']:<28} top-1 {r['top1']:.4f} top-5 {r['top5']:.4f} ({r['prune_s']:.0f} s pruning)"


def gap_closed(results: list[dict]) -> None:
    """``gap``: the share of the top-1 a pattern loses without permutation that a row wins back, towards
    unstructured 50%; ``gap_dense``: the same share towards the dense model (the seed paper's measure)."""
    by_label = {r["label"]: r for r in results if "error" not in r}
    for r in results:
        base = by_label.get(f"{r['label'].split(' ')[0]} wanda + none")
        if "error" in r or base is None or r is base:
            continue
        for key, limit in (("gap", LIMIT_ROW), ("gap_dense", "dense")):
            if limit in by_label:
                span = by_label[limit]["top1"] - base["top1"]
                r[key] = (r["top1"] - base["top1"]) / span if span else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar10-vit", help="an image classifier: alias, HF folder or hub id")
    parser.add_argument("--calib", default="cifar10", help="calibration images (cifar10 or imagefolder:PATH)")
    parser.add_argument("--nsamples", type=int, default=512, help="calibration images")
    parser.add_argument("--holdout", type=int, default=64, help="held-out images the learned rows are judged on")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass collecting statistics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--binding", default="per-linear", help="binding of the permutation rows")
    parser.add_argument("--steps", type=int, default=300, help="learned rows: training steps")
    parser.add_argument("--init", default="output", help="learned rows: the search they start from")
    parser.add_argument("--learn-batch", type=int, default=32, help="learned rows: images per training step")
    parser.add_argument("--judge-every", type=int, default=10, help="learned rows: steps between judgments")
    parser.add_argument("--eval", default="test", choices=["test", "validation"], help="evaluation images: the "
                        "CIFAR-10 test split, or training images no row calibrates on (where settings are chosen)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate N images, a seeded draw (default: every "
                        "test image; 5,000 validation images)")
    add_row_args(parser, "vision")
    args = parser.parse_args()

    from permsparse.models.loading import TESTBED_ALIAS, cache_dir
    from permsparse.models.vit_testbed import testbed_folder

    if args.model == TESTBED_ALIAS:
        print(f"testbed: {testbed_folder(cache_dir())}", flush=True)  # built here once, not in every row
    rows = rows_for(args)
    where = (f"{args.limit or 5000} validation images of {args.calib}" if args.eval == "validation"
             else f"{'all' if args.limit is None else f'{args.limit} (seeded)'} CIFAR-10 test images")
    print(f"vision Transformers: {args.model}, calibration {args.nsamples} images of {args.calib} (seed {args.seed}); "
          f"evaluation: {where}", flush=True)
    results = run_spawned(rows, args, run_row, describe)
    gap_closed(results)
    print_table(results, [("label", "method", ""), ("top1", "top-1", ".4f"), ("top5", "top-5", ".4f"),
                          ("gap", "gap to 50%", ".3f"),
                          ("gap_dense", "gap to dense", ".3f"), ("images", "images", "d"), ("prune_s", "prune s", ".0f"),
                          ("eval_s", "eval s", ".0f"), ("peak_rss_mb", "peak MB", ".0f")])
    print(f"saved {save_json(args.save_as, vars(args), results)}")


if __name__ == "__main__":
    main()
