"""The ``permsparse`` command line: ``prune`` a model to N:M and ``eval`` its perplexity."""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from . import __version__
from .evaluation import perplexity
from .export import FALLBACKS, FORMATS, check_command, check_output_free, export_checkpoint, partial_dir, validate_export
from .models import SMOLLM2_ALIAS, load_model
from .pruning import BINDINGS, LEARN_INITS, LEARN_LOSSES, LEARN_MODES, PROPAGATIONS, PruneConfig, perm_choices, prune
from .scores import SCORES

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError)


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune a model to N:M sparsity and save a checkpoint")
    p.add_argument("--model", default=SMOLLM2_ALIAS, help=f"hub id, HF folder, .gguf file or {SMOLLM2_ALIAS!r}")
    p.add_argument("--pattern", default="2:4", help="N:M (2:4, 4:8, ...) or unstructured sparsity like 50%%")
    p.add_argument("--score", default="wanda", choices=sorted(SCORES))
    p.add_argument("--perm", default="none", choices=perm_choices(),
                   help="channel permutation: a search, or 'learned' (trained from a search's result)")
    p.add_argument("--binding", default="per-linear", choices=BINDINGS,
                   help="one permutation per linear, or shared by the linears that read one input (foldable)")
    p.add_argument("--groups", dest="perm_groups", type=int, default=1,
                   help="split channels into G contiguous groups, each permuted on its own")
    learn = p.add_argument_group("learned permutation (--perm learned)")
    learn.add_argument("--mode", dest="learn_mode", default="e2e", choices=LEARN_MODES,
                       help="e2e: the whole model at once on CE + alpha * distillation (best; memory of training "
                            "the whole model); blockwise: each block against the dense block's outputs (memory of "
                            "one block, for large models)")
    learn.add_argument("--alpha", dest="learn_alpha", type=float, default=1.0,
                       help="e2e: weight of the layer-wise distillation (0: cross-entropy only)")
    learn.add_argument("--no-ce", dest="learn_ce", action="store_false",
                       help="e2e: drop the cross-entropy term (distillation only)")
    learn.add_argument("--init", dest="learn_init", default="output", choices=LEARN_INITS,
                       help="warm start: a search's permutation, or random")
    learn.add_argument("--loss", dest="learn_loss", default="mse", choices=LEARN_LOSSES)
    learn.add_argument("--learn-batch", type=int, default=None,
                       help="windows per training step (default 2 for e2e, 4 for blockwise)")
    for flag, kind, help_ in [("--steps", int, "training steps per block"), ("--lr", float, "AdamW learning rate"),
                              ("--eps-start", float, "Sinkhorn temperature at the start"),
                              ("--eps-end", float, "Sinkhorn temperature at the end"),
                              ("--sinkhorn-iters", int, "Sinkhorn iterations")]:
        learn.add_argument(flag, type=kind, default=None, help=f"{help_} (default: LearnConfig's)")
    learn.add_argument("--train-mode", default=None, choices=["ste", "soft"],
                       help="hard forward with Sinkhorn gradient (ste) or the soft permutation")
    p.add_argument("--calib", default="wikitext2-valid", help="calibration source name or text file")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--include", nargs="*", default=[], help="glob patterns of linear names to prune")
    p.add_argument("--exclude", nargs="*", default=[], help="glob patterns of linear names to keep dense")
    p.add_argument("--propagate", default="pruned", choices=PROPAGATIONS,
                   help="feed each block the pruned (default) or dense previous block's outputs")
    p.add_argument("--no-compensate", dest="compensate", action="store_false",
                   help="--perm output aims each linear at the dense model's outputs from the pruned model's inputs, "
                        "so its permutation makes up for error from earlier layers (two more passes of each block); "
                        "this aims at the linear's own outputs on the pruned inputs instead")
    p.add_argument("--strict", action="store_true", help="fail on layers whose in_features is not divisible by M")
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--eval-windows", type=int, default=16,
                   help="WikiText-2 windows (of --seqlen) to evaluate after pruning; 0 skips")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--export", default="masked", choices=FORMATS,
                   help="masked: W*unpermute(mask), plain HF; folded: fold exact permutations so those linears "
                        "are N:M in storage order")
    p.add_argument("--fold-fallback", default="masked", choices=FALLBACKS,
                   help="linears that cannot fold: keep masked (plain HF) or store permuted with a runtime gather "
                        "(needs permsparse.load)")


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="verify a checkpoint: N:M of every pruned linear and the recorded logits")
    p.add_argument("folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tolerance", type=float, default=None, help="relative logits tolerance (default by dtype)")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a model or pruned checkpoint (method.md §5)")
    p.add_argument("model", help=f"hub id, HF folder, .gguf file or {SMOLLM2_ALIAS!r}")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=None, help="only the first K windows (default: all)")
    p.add_argument("--source", default="wikitext2", help="evaluation text (default WikiText-2 raw test)")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def _learn_options(args) -> dict:
    """LearnConfig overrides given on the command line."""
    names = {"steps": "steps", "lr": "lr", "eps_start": "eps_start", "eps_end": "eps_end",
             "sinkhorn_iters": "sinkhorn_iters", "train_mode": "mode"}
    return {field: getattr(args, arg) for arg, field in names.items() if getattr(args, arg) is not None}


def run_prune(args) -> None:
    check_output_free(args.out, args.overwrite)
    validate_export(args.export, args.fold_fallback, args.pattern)
    staging = partial_dir(args.out)
    if args.overwrite and staging.exists():
        shutil.rmtree(staging)
    config = PruneConfig(
        pattern=args.pattern, score=args.score, perm=args.perm, binding=args.binding, perm_groups=args.perm_groups,
        calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed,
        include=tuple(args.include), exclude=tuple(args.exclude), propagate=args.propagate,
        compensate=args.compensate, strict=args.strict, learn_mode=args.learn_mode, learn_init=args.learn_init,
        learn_loss=args.learn_loss, learn_alpha=args.learn_alpha, learn_ce=args.learn_ce, learn_batch=args.learn_batch, learn=_learn_options(args),
    )
    config.validate()
    model, tokenizer = load_model(args.model, getattr(torch, args.dtype))
    report = prune(model, tokenizer, config, state_dir=staging / ".resume")
    metrics = {}
    if args.eval_windows > 0:
        result = perplexity(model, tokenizer, seqlen=args.seqlen, windows=args.eval_windows)
        metrics["wikitext2"] = result.to_dict()
        print(f"pruned ppl {result.ppl:.2f} (WikiText-2 raw test, first {result.windows} windows of {args.seqlen})")
    metadata = {"permsparse_version": __version__, "model": args.model, **asdict(report),
                "metrics": metrics}
    export_checkpoint(model, tokenizer, args.out, metadata, export_format=args.export, fallback=args.fold_fallback,
                      hidden_perm=report.hidden_permutation, overwrite=args.overwrite, in_place=True)
    print(f"saved {args.out} ({report.seconds:.1f} s pruning, peak RSS {report.peak_rss_mb:.0f} MB)")


def run_eval(args) -> None:
    model, tokenizer = load_model(args.model, getattr(torch, args.dtype))
    result = perplexity(model, tokenizer, seqlen=args.seqlen, windows=args.windows, source=args.source)
    print(f"{args.model}: ppl {result.ppl:.3f} on {result.source}, {result.windows} windows x {result.seqlen} tokens "
          f"({result.tokens} predicted tokens, {result.seconds:.1f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, **result.to_dict()}, indent=1))


def run_check(args) -> int:
    code, lines = check_command(args.folder, args.device, args.tolerance)
    print("\n".join(lines), file=sys.stdout if code == 0 else sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="permsparse", description=__doc__)
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    _add_eval(sub)
    _add_check(sub)
    args = parser.parse_args(argv)
    try:
        return {"prune": run_prune, "eval": run_eval, "check": run_check}[args.command](args) or 0
    except USER_ERRORS as err:
        print(f"permsparse: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("permsparse: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
