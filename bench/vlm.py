"""Vision-language models: the seed paper's third table, on the cifar10-vlm testbed.

Rows: dense; for each tower pruned (``--towers``, language by default as in the paper, and vision),
2:4 Wanda with each permutation (none, cp, ria, output, learned), and unstructured 50% Wanda (the
reference limit). The language tower calibrates on ``--calib`` (image-text windows of CIFAR-10 *training*
images with their captions, mixed with C4 text, ``--nsamples`` windows of ``--seqlen`` tokens); the vision
tower on ``--vision-nsamples`` CIFAR-10 training images. Learned rows use ``permsparse prune --perm
learned``'s defaults (``--steps`` and ``--init`` override them). Every row is judged on CIFAR-10's *test*
split, which nothing calibrates, trains or chooses on (``--limit`` images, a seeded draw): ten-way accuracy
of the likeliest class name and the true caption's perplexity (:mod:`permsparse.evaluate.vlm`); the cosine of
what the projector reads (the vision tower's ``vision_feature_layer``, per token) to the dense model's on
``--feature-images`` of them, the vision tower judged as an encoder; and on the language model's text:
WikiText-2 test perplexity over its first ``--text-windows`` windows of ``--seqlen`` tokens. The projector
and embeddings stay dense. Gap closed, on accuracy: (accuracy - that of the same tower's 2:4 without
permutation) / (the dense accuracy - the same), the seed paper's measure. ``--eval validation`` judges
instead on training images that neither the projector nor any row's calibration saw (the testbed's
held-out images less the calibration draws): where this benchmark's settings are chosen.

Each row runs in its own process (its peak memory its own); the testbed is built first, once, in this
process (``--model cifar10-vlm``). Results: ``bench/results/vlm.json``.
"""
from __future__ import annotations

import argparse
import time

from common import Row, add_row_args, print_table, run_spawned, save_json

from permsparse import Calibration, Learned, PruneConfig, Search

METHODS = ("none", "cp", "ria", "output", "learned")


def rows_for(args) -> list[Row]:
    rows = [Row("dense", None)]
    for tower in args.towers:
        if tower == "language":
            calib = Calibration(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                                holdout=args.holdout)
        else:
            calib = Calibration(source=args.vision_calib, nsamples=args.vision_nsamples, seed=args.seed,
                                holdout=args.holdout, batch_size=32)
        rows.append(Row(f"{tower}: 50% wanda", PruneConfig(pattern="50%", calibration=calib, towers=tower)))
        for method in METHODS:
            options = {"steps": args.steps} if args.steps else {}
            options.update({"init": args.init} if args.init else {})
            permutation = Learned(**options) if method == "learned" else Search(method)
            rows.append(Row(f"{tower}: 2:4 wanda + {method}", PruneConfig(permutation=permutation, calibration=calib,
                                                                           towers=tower)))
    return rows


def run_row(row: Row, args) -> dict:
    import torch

    from permsparse import load_model, prune
    from permsparse.evaluate.measures import perplexity
    from permsparse.models.loading import text_tokenizer
    from permsparse.report import peak_rss_mb
    from permsparse.serial import to_dict
    from permsparse.evaluate.vlm import evaluate

    torch.set_num_threads(args.threads)
    model, processor = load_model(args.model)
    result = {"label": row.label, "prune_s": 0.0, "config": None if row.config is None else to_dict(row.config)}
    validation = validation_images(args, processor) if args.eval == "validation" else None
    pixels = feature_images(processor, args, validation)
    dense_features = projector_input(model, pixels)
    if row.config is not None:
        report = prune(model, processor, row.config, progress=False)
        result.update(prune_s=report.seconds, stages=report.stages, layers=len(report.layers),
                      training=to_dict(report.training), prune_peak_rss_mb=peak_rss_mb())
    started = time.perf_counter()
    if args.eval == "validation":
        scored = evaluate(model, processor, "cifar10", index=validation, limit=args.limit, progress=False)
    else:
        scored = evaluate(model, processor, limit=args.limit, progress=False)
    text = perplexity(model, text_tokenizer(processor), seqlen=args.seqlen, windows=args.text_windows,
                      source="wikitext2", progress=False)
    cosine = torch.nn.functional.cosine_similarity(projector_input(model, pixels), dense_features, dim=-1)
    result.update(feature_cosine=float(cosine.mean()), feature_images=len(pixels))
    result.update(accuracy=scored.accuracy, caption_ppl=scored.caption_ppl, images=scored.images,
                  wikitext2_ppl=text.ppl, eval_s=time.perf_counter() - started, peak_rss_mb=peak_rss_mb())
    return result


def feature_images(processor, args, validation=None):
    """Pixel values of the images the vision features are compared on: ``--feature-images`` of those the
    accuracy is scored on (a seeded draw; ``validation``: the validation images' indices)."""
    import torch

    from permsparse.data.images import load_images, preprocess

    source = "cifar10" if validation is not None else "cifar10-test"
    pool = validation if validation is not None else torch.arange(len(load_images(source)))
    index = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(1))[:args.feature_images]]
    return preprocess(processor.image_processor, load_images(source), index)


def projector_input(model, pixels):
    """What the projector reads of the vision tower on ``pixels`` (as the vision tower's objective reads it)."""
    import torch

    from permsparse.discover import vision_tower
    from permsparse.per_tower import reading_projector_input

    _, tower = vision_tower(model)
    with torch.no_grad(), reading_projector_input(model, tower):
        return tower(pixels).last_hidden_state.float()


def validation_images(args, processor):
    """The training images no row reads: those the testbed's projector never trained on, less every image
    the language and the vision tower's calibration (held-out images included) draw."""
    import torch

    from permsparse import Calibration, PruneConfig
    from permsparse.data.images import calibration_index, image_count
    from permsparse.data.calibration import calibration_images
    from permsparse.models.vlm_testbed import split

    total = image_count(args.vision_calib)
    _, held = split(total)
    language = PruneConfig(calibration=Calibration(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                                                   seed=args.seed, holdout=args.holdout))
    used = torch.cat([calibration_images(processor, language),
                      calibration_index(total, args.vision_nsamples, args.holdout, args.seed)])
    return held[~torch.isin(held, used)]


def describe(r: dict) -> str:
    """A finished row, as the console shows it."""
    return (f"{r['label']:<30} accuracy {r['accuracy']:.4f} caption ppl {r['caption_ppl']:.3f} "
            f"feature cosine {r['feature_cosine']:.4f} "
            f"WikiText-2 ppl {r['wikitext2_ppl']:.2f} ({r['prune_s']:.0f} s pruning)")


def gap_closed(results: list[dict]) -> None:
    """``gap``: the share of the accuracy a tower's 2:4 without permutation loses that a row wins back."""
    by_label = {r["label"]: r for r in results if "error" not in r}
    dense = by_label.get("dense")
    for r in results:
        base = by_label.get(f"{r['label'].split(':')[0]}: 2:4 wanda + none")
        if "error" in r or dense is None or base is None or r is base or r is dense:
            continue
        span = dense["accuracy"] - base["accuracy"]
        r["gap"] = (r["accuracy"] - base["accuracy"]) / span if span else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cifar10-vlm", help="a vision-language model: alias or HF folder")
    parser.add_argument("--towers", nargs="+", default=["language", "vision"], choices=["language", "vision"])
    parser.add_argument("--calib", default="cifar10-captions:1,c4:1", help="language tower: calibration mixture")
    parser.add_argument("--nsamples", type=int, default=32, help="language tower: calibration windows")
    parser.add_argument("--seqlen", type=int, default=512, help="tokens per window (calibration and WikiText-2)")
    parser.add_argument("--vision-calib", default="cifar10", help="vision tower: calibration images")
    parser.add_argument("--vision-nsamples", type=int, default=512, help="vision tower: calibration images")
    parser.add_argument("--holdout", type=int, default=8, help="held-out windows (images) the learned rows are "
                        "judged on")
    parser.add_argument("--steps", type=int, default=0, help="learned rows: training steps (0: the CLI's default)")
    parser.add_argument("--init", default=None, help="learned rows: the search they start from (default: the CLI's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=2000, help="CIFAR-10 images scored (a seeded draw)")
    parser.add_argument("--eval", default="test", choices=["test", "validation"], help="images scored: CIFAR-10's "
                        "test split, or training images that neither the projector nor any row's calibration saw "
                        "(where settings are chosen)")
    parser.add_argument("--feature-images", type=int, default=512, help="images the vision tower's features are "
                        "compared to the dense model's on (cosine of the projector's input)")
    parser.add_argument("--text-windows", type=int, default=32, help="WikiText-2 test windows")
    add_row_args(parser, "vlm", threads=2)
    args = parser.parse_args()

    from permsparse.models.loading import cache_dir
    from permsparse.models.vlm_testbed import ALIAS, vlm_folder

    if args.model == ALIAS:
        print(f"testbed: {vlm_folder(cache_dir())}", flush=True)  # built here once, not in every row
    rows = rows_for(args)
    print(f"vision-language model {args.model}: language tower on {args.nsamples} x {args.seqlen} tokens of "
          f"{args.calib}, vision tower on {args.vision_nsamples} images of {args.vision_calib} (seed {args.seed}); "
          f"judged on {args.limit} CIFAR-10 {'validation' if args.eval == 'validation' else 'test'} images and "
          f"{args.text_windows} WikiText-2 windows", flush=True)
    results = run_spawned(rows, args, run_row, describe)
    gap_closed(results)
    print_table(results, [("label", "row", ""), ("accuracy", "accuracy", ".4f"), ("gap", "gap to dense", ".3f"),
                          ("caption_ppl", "caption ppl", ".3f"), ("feature_cosine", "feature cos", ".4f"),
                          ("wikitext2_ppl", "WikiText-2 ppl", ".2f"),
                          ("prune_s", "prune s", ".0f"), ("eval_s", "eval s", ".0f"),
                          ("peak_rss_mb", "peak MB", ".0f")])
    print(f"saved {save_json(args.save_as, vars(args), results)}")


if __name__ == "__main__":
    main()
