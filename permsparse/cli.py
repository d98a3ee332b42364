"""The ``permsparse`` command line: ``prune`` a model, ``eval`` a model or checkpoint, ``check`` a checkpoint,
``report`` on checkpoints.

The ``prune`` flags are built from the config dataclasses (:mod:`permsparse.config`,
:class:`permsparse.checkpoint.save.ExportConfig`): each field's flag, type, choices, help and default
come from the field itself, so nothing here restates them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import shutil
import sys
import typing
from pathlib import Path
from typing import Literal

import torch
from transformers.utils import logging as hf_logging

from . import data, distributed
from .checkpoint.check import check_checkpoint
from .checkpoint.load import load
from .checkpoint.save import ExportConfig, check_export, check_output_free, export_checkpoint, partial_dir
from .config import SEARCH_METHODS, Calibration, Distill, Learned, PruneConfig, Quantization, Search
from .evaluation import embedding_similarity, perplexity, sentence_similarity
from .images import TEST_SPLITS, accuracy, evaluation_images, is_classifier, is_image_source, reads_images
from .models import SMOLLM2_ALIAS, TESTBED_ALIAS, VLM_ALIAS, is_vlm, load_model, load_preprocessor, text_tokenizer
from .placement import DTYPES, Placement, compute_device, compute_dtype, input_device, place
from .serial import to_dict
from .towers import tower_source
from .vlm_eval import TASK as VLM_TASK

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError)
log = logging.getLogger("permsparse")


def _logging(file: Path | None = None, quiet: bool = False) -> None:
    """Messages to stdout (unless ``quiet``), and with a time stamp to ``file`` (the run's ``log.txt``)."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    if quiet:
        log.addHandler(logging.NullHandler())
        return
    out = logging.StreamHandler(sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(out)
    if file is not None:
        file.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_config_flags(parser, cls: type, choices: dict[str, tuple] | None = None) -> None:
    """One flag per documented field of ``cls``; only flags the user gives reach the parsed namespace,
    so every default stays the dataclass's own."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__doc__.splitlines()[0].rstrip("."))
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        kind, dest = hints[f.name], f"{cls.__name__}.{f.name}"
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        common = dict(dest=dest, default=argparse.SUPPRESS)
        text = f.metadata["help"].replace("%", "%%")  # argparse formats help strings with %
        if kind is bool:
            flag = _flag(f) if not default else "--no-" + _flag(f)[2:]
            group.add_argument(flag, action="store_false" if default else "store_true", help=text, **common)
        elif typing.get_origin(kind) is Literal:
            values = (choices or {}).get(f.name, typing.get_args(kind))
            group.add_argument(_flag(f), choices=values, help=f"{text} (default: {default})", **common)
        elif typing.get_origin(kind) is tuple:
            group.add_argument(_flag(f), nargs="*", help=text, **common)
        else:
            group.add_argument(_flag(f), type=kind, help=f"{text} (default: {default})", **common)


def given(args: argparse.Namespace, cls: type) -> dict:
    """The fields of ``cls`` the user gave on the command line."""
    prefix = cls.__name__ + "."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}


def _flags_of(cls: type, names) -> str:
    by_name = {f.name: _flag(f) for f in dataclasses.fields(cls)}
    return ", ".join(by_name[n] for n in names)


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """The :class:`PruneConfig` the prune flags describe; flags of the other permutation kind are an error."""
    search, learned = given(args, Search), given(args, Learned)
    method = search.pop("method", "none")
    if method == "learned":
        if search:
            raise ValueError(f"{_flags_of(Search, search)} only apply to a permutation search, not --perm learned")
        permutation = Learned(**learned)
    else:
        if learned:
            raise ValueError(f"{_flags_of(Learned, learned)} only apply to --perm learned")
        permutation = Search(method=method, **search)
    return PruneConfig(permutation=permutation, calibration=Calibration(**given(args, Calibration)),
                       distill=Distill(**given(args, Distill)), quant=Quantization(**given(args, Quantization)),
                       **given(args, PruneConfig))


def _add_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune a model to N:M sparsity and save a checkpoint")
    p.add_argument("--model", default=SMOLLM2_ALIAS,
                   help=f"hub id, HF folder, .gguf file, {SMOLLM2_ALIAS!r} or {TESTBED_ALIAS!r} (a CIFAR-10 ViT built here)")
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder")
    p.add_argument("--eval-windows", type=int, default=16,
                   help="windows (of --seqlen tokens) of each --eval-texts text to evaluate after pruning; 0 skips")
    p.add_argument("--eval-texts", default="wikitext2,shakespeare",
                   help="comma-separated texts whose perplexity is recorded after pruning (WikiText-2 test, and Tiny "
                        "Shakespeare as an out-of-domain text)")
    p.add_argument("--eval-tasks", default="", help="comma-separated zero-shot tasks recorded after pruning (see eval)")
    p.add_argument("--eval-limit", type=int, default=None, help="score only the first N items of each --eval-tasks task")
    p.add_argument("--eval-images", type=int, default=None,
                   help="image models: top-1/top-5 on N (seeded) images calibration did not use (CIFAR-10's test split "
                        "for --calib cifar10, the rest of the folder for imagefolder:PATH); default all, 0 skips")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="the model's compute dtype (auto: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(p, Placement)
    add_config_flags(p, PruneConfig)
    add_config_flags(p, Search, choices={"method": (*SEARCH_METHODS, "learned")})
    add_config_flags(p, Learned)
    add_config_flags(p, Calibration)
    add_config_flags(p, Distill)
    add_config_flags(p, Quantization)
    add_config_flags(p, ExportConfig)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity (WikiText-2 test by default) and zero-shot accuracy of a model or "
                                    "pruned checkpoint")
    p.add_argument("model", help=f"hub id, HF folder, permsparse checkpoint, .gguf file, {SMOLLM2_ALIAS!r}, "
                                 f"{TESTBED_ALIAS!r} or {VLM_ALIAS!r}")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per window (published LLaMA numbers: 2048)")
    p.add_argument("--windows", type=int, default=None, help="only the first K windows (default: all; 0 skips)")
    p.add_argument("--source", default="wikitext2", help="evaluation text (default WikiText-2 raw test)")
    p.add_argument("--tasks", default="", help="comma-separated lm-evaluation-harness tasks (arc_easy, arc_challenge, "
                   "boolq, hellaswag, openbookqa, winogrande, piqa, lambada_openai, mmlu); needs the [eval] extra")
    p.add_argument("--num-fewshot", type=int, default=None, help="shots per task (default: 0, and 5 for mmlu)")
    p.add_argument("--limit", type=int, default=None,
                   help="score only the first N items of each task (--task: N seeded images)")
    p.add_argument("--task", default=None, help="image classifiers: top-1/top-5 on cifar10 (its test split) or "
                   "imagefolder:PATH (one sub-folder per class); vision-language models: cifar10-vlm (ten-way "
                   "accuracy of the likeliest class name and caption perplexity on CIFAR-10's test split)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="the model's compute dtype (auto: bfloat16 on a GPU, float32 on the CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(p, Placement)


def _add_check(sub) -> None:
    p = sub.add_parser("check", help="verify a checkpoint: N:M of every pruned linear and the recorded logits")
    p.add_argument("folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tolerance", type=float, default=None, help="relative logits tolerance (default by dtype)")


def _tasks(spec: str) -> list[str]:
    """Task names from a comma-separated list, checked before any long work."""
    tasks = [t for t in spec.split(",") if t]
    if tasks:
        from .zeroshot import TASKS

        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    return tasks


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page (and PNGs) comparing pruned checkpoints")
    p.add_argument("folders", nargs="+", metavar="DIR", help="permsparse checkpoint folders")
    p.add_argument("--out", default="report", help="output folder: index.html and PNGs (other files stay)")
    p.add_argument("--label", action="append", default=None, help="a label per checkpoint, in order (default: folder names)")
    p.add_argument("--title", default="permsparse report")


def run_report(args) -> int:
    from .report_html import write_report  # matplotlib only for this command

    print(f"wrote {write_report(args.folders, args.out, labels=args.label, title=args.title)}")
    return 0


def run_prune(args) -> int:
    from .pipeline import prune

    tasks = _tasks(args.eval_tasks)
    config = config_from_args(args)
    export = ExportConfig(**given(args, ExportConfig))
    check_export(export, config)
    check_output_free(args.out, args.overwrite)
    distributed.initialise()  # under torchrun: rank 0 logs, evaluates and writes; every rank prunes
    placement = Placement(**given(args, Placement))
    device = compute_device(placement.device)  # this process's (after initialise: cuda:LOCAL_RANK under torchrun)
    dtype = compute_dtype(args.dtype, device)
    main_rank = distributed.is_main()
    staging = partial_dir(args.out)
    if args.overwrite and staging.exists() and main_rank:
        shutil.rmtree(staging)
    distributed.barrier()
    _logging(staging / "log.txt" if main_rank else None, quiet=not main_rank)
    log.info("%s", args.command_line)
    log.info("config: %s", json.dumps(to_dict(config)))
    log.info("device %s (--device %s), dtype %s", device, placement.device, str(dtype).removeprefix("torch."))
    model, tokenizer = load_model(args.model, dtype)  # a vision-language model: its processor
    texts = [t for t in args.eval_texts.split(",") if t]
    text_only = text_tokenizer(tokenizer)
    if args.eval_windows != 0 and not reads_images(model) and config.towers != "vision":
        for text in texts:
            data.check_disjoint(text_only, tower_source(config.calibration.source, "language") if is_vlm(model)
                                else config.calibration.source, text, config.calibration.seqlen, args.eval_windows)
    report = prune(model, tokenizer, config, state_dir=staging / ".resume", progress=not args.quiet and main_rank,
                   placement=placement)
    if not main_rank:
        return 0
    memory = "" if report.peak_device_mb is None else f", peak {report.peak_device_mb:.0f} MB on the GPU"
    log.info("pruned in %.1f s (%s)%s", report.seconds,
             ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in report.stages.items()), memory)
    if report.distillation is not None:
        record = report.distillation
        moved = ("" if config.distill.masks == "fixed"
                 else f"; {100 * record.moved:.2f}% of the pruning's kept entries moved out of the masks")
        log.info("distillation: %d steps, %.2f s per step (judgments included); kept step %d, judged %.4g%s",
                 len(record.loss), record.seconds_per_step, record.best_step, record.best_judged, moved)
    if report.dense:
        log.info("kept dense: %d mixture-of-experts routers (%s ...)", len(report.dense), report.dense[0])
    if report.uncalibrated:
        log.info("no calibration token reached %d expert linears; scored as if their inputs were white "
                 "(Wanda: by magnitude): %s", len(report.uncalibrated), ", ".join(report.uncalibrated))
    if reads_images(model):
        metrics = evaluate_images(model, tokenizer, config, args)
    else:
        metrics = evaluate(model, text_only, args.model, texts, args,
                           seqlen=config.calibration.seqlen, windows=args.eval_windows)
    zero_shot_results = []
    if tasks:
        from .zeroshot import format_table, zero_shot

        zero_shot_results = zero_shot(model, text_only, tasks, limit=args.eval_limit, progress=not args.quiet)
        log.info("%s", format_table(zero_shot_results))
    export_checkpoint(model, tokenizer, args.out, config, report, export=export, model_name=args.model,
                      metrics=metrics, zero_shot=zero_shot_results, command=args.command_line, overwrite=args.overwrite,
                      in_place=True)
    log.info("saved %s (%.1f s pruning, peak RSS %.0f MB)", args.out, report.seconds, report.peak_rss_mb)
    _logging()
    return 0


def evaluate(model, tokenizer, model_name: str, texts: list[str], args, *, seqlen: int,
             windows: int | None) -> dict:
    """Perplexity on each text; for an encoder (no LM head, so no perplexity) the mean cosine between its
    final hidden states and the dense model's (``model_name`` loaded again), and the log says so."""
    if windows == 0 or not texts:
        return {}
    metrics, dense = {}, None
    if model.get_output_embeddings() is None:
        dense, _ = load_model(model_name, next(model.parameters()).dtype)
        dense.to(input_device(model))
        log.info("%s has no language-model head: reporting the cosine of its embeddings to the dense model's "
                 "instead of perplexity", model_name)
    for text in texts:
        if dense is None:
            result = perplexity(model, tokenizer, seqlen=seqlen, windows=windows, source=text, progress=not args.quiet)
            log.info("ppl %.3f on %s, %d windows x %d tokens (%d predicted tokens, %.1f s)", result.ppl, text,
                     result.windows, result.seqlen, result.tokens, result.seconds)
        else:
            result = embedding_similarity(model, dense, tokenizer, seqlen=seqlen, windows=windows, source=text,
                                          progress=not args.quiet)
            log.info("embedding cosine %.4f to the dense model on %s, %d windows x %d tokens (%.1f s)", result.cosine,
                     text, result.windows, result.seqlen, result.seconds)
            pooled = sentence_similarity(model, dense, tokenizer, source=text, progress=not args.quiet)
            log.info("sentence embeddings (mean-pooled) on %d passages of %s: cosine %.4f to the dense model's, "
                     "nearest passage kept for %.1f%%", pooled.sentences, text, pooled.cosine, 100 * pooled.neighbours)
        metrics[text] = result
    return metrics


def evaluate_images(model, processor, config: PruneConfig, args) -> dict:
    """Top-1/top-5 of a pruned image classifier on images its calibration did not use; the log says that
    only the blocks' linears were pruned (the patch embedding and the classifier stay dense)."""
    from .adapters import adapter_for

    adapter = adapter_for(model)
    dense = [n for n, m in model.named_modules() if m is model.get_input_embeddings()] + list(adapter.output_readers)
    log.info("kept dense: %s (only the linears of %s are pruned)", ", ".join(dense), adapter.blocks_path)
    if args.eval_images == 0:
        return {}
    if not is_classifier(model):
        log.info("%s has no classifier head: no accuracy to report", type(model).__name__)
        return {}
    calib = config.calibration
    if is_image_source(calib.source):
        held = calib.holdout if config.learned is not None else 0
        source, exclude = evaluation_images(calib.source, calib.nsamples, held, calib.seed)
    else:
        source, exclude = TEST_SPLITS["cifar10"], None
    result = accuracy(model, processor, source, limit=args.eval_images, exclude=exclude, progress=not args.quiet)
    log.info("top-1 %.4f, top-5 %.4f on %d images of %s%s (%.1f s)", result.top1, result.top5, result.images, source,
             " the calibration did not draw" if exclude is not None else "", result.seconds)
    return {source: result}


def image_task(task: str) -> str:
    """The image source of ``eval --task``: CIFAR-10's test split, or an image folder."""
    if task in TEST_SPLITS:
        return TEST_SPLITS[task]
    if task in TEST_SPLITS.values() or task.startswith("imagefolder:"):
        return task
    raise ValueError(f"unknown image task {task!r}: use cifar10 (its test split) or imagefolder:PATH")


def _eval_vlm(model, processor, args, out: dict) -> int:
    """``eval --task cifar10-vlm``: a vision-language model's ten-way CIFAR-10 accuracy and caption perplexity."""
    if not is_vlm(model):
        raise ValueError(f"--task {VLM_TASK} scores vision-language models; {type(model).__name__} is not a "
                         "vision-language model")
    if args.task != VLM_TASK:
        raise ValueError(f"{type(model).__name__} is a vision-language model: give --task {VLM_TASK}")
    from .vlm_eval import evaluate

    result = evaluate(model, processor, limit=args.limit, progress=not args.quiet)
    print(f"accuracy {result.accuracy:.4f} (ten-way), caption ppl {result.caption_ppl:.3f} on {result.images} images "
          f"of {result.source} ({result.seconds:.1f} s)")
    out[VLM_TASK] = to_dict(result)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def run_eval(args) -> int:
    tasks = _tasks(args.tasks)
    _logging()
    dense_name = args.model
    placement = Placement(**given(args, Placement))
    device = compute_device(placement.device)
    dtype = compute_dtype(args.dtype, device)
    if (Path(args.model) / "permsparse.json").is_file():
        from .checkpoint.record import read_record

        model = load(args.model, dtype=dtype)
        tokenizer = load_preprocessor(args.model, model)
        dense_name = read_record(args.model).model
    else:
        model, tokenizer = load_model(args.model, dtype)
    place(model, placement)
    out: dict = {"model": args.model}
    if args.task == VLM_TASK or (args.task and is_vlm(model)):
        return _eval_vlm(model, tokenizer, args, out)
    if reads_images(model) or args.task:
        if not (reads_images(model) and is_classifier(model)):
            raise ValueError(f"--task scores image classifiers; {type(model).__name__} is not one")
        if not args.task:
            raise ValueError(f"{type(model).__name__} classifies images: give --task cifar10 or imagefolder:PATH")
        result = accuracy(model, tokenizer, image_task(args.task), limit=args.limit, progress=not args.quiet)
        print(f"top-1 {result.top1:.4f}, top-5 {result.top5:.4f} on {result.images} images of {result.source} "
              f"({result.seconds:.1f} s)")
        out["accuracy"] = to_dict(result)
        if args.json:
            Path(args.json).write_text(json.dumps(out, indent=1))
        return 0
    metrics = evaluate(model, tokenizer, dense_name, [args.source], args, seqlen=args.seqlen, windows=args.windows)
    if metrics:
        out["perplexity" if model.get_output_embeddings() is not None else "similarity"] = to_dict(metrics[args.source])
    if tasks:
        from .zeroshot import format_table, zero_shot

        results = zero_shot(model, tokenizer, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                            progress=not args.quiet)
        print(format_table(results))
        out["zero_shot"] = to_dict(results)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def run_check(args) -> int:
    try:
        report = check_checkpoint(args.folder, device=args.device, tolerance=args.tolerance)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"permsparse: error: {err}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def _add_speed(sub) -> None:
    from .deploy.speed import CANDIDATES, SHAPES

    p = sub.add_parser("speed", help="dense against 2:4 on this GPU: prefill, decode, memory and logit error of a "
                                     "checkpoint or of a random model of a named shape")
    p.add_argument("checkpoint", nargs="?", default="", help="permsparse checkpoint folder (default: a random model "
                                                            "of --shape, every block linear pruned to 2:4)")
    p.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES), help="shape of the random model")
    p.add_argument("--layers", type=int, default=0, help="only the first K blocks of the random model (default all)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--prefill", default="1x2048,4x2048,1x8192", help="prefill shapes, BATCHxTOKENS, comma-separated")
    p.add_argument("--decode-batch", type=int, default=1, help="sequences per decode step")
    p.add_argument("--decode-tokens", type=int, default=128,
                   help="decode steps per prompt: how much decode weighs against prefill when choosing what runs 2:4")
    p.add_argument("--candidates", default=",".join(CANDIDATES),
                   help="comma-separated, timed at the first prefill shape; the fastest exact one at all shapes")
    p.add_argument("--permuted", action="store_true",
                   help="random model: store the residual readers and attention outputs permuted with runtime "
                        "gathers, as a per-linear-binding export does")
    p.add_argument("--json", help="also write the results to this JSON file")


def run_speed(args) -> int:
    from .deploy.speed import SpeedConfig, format_table, measure_speed, parse_prefill, speed_problem

    config = SpeedConfig(checkpoint=args.checkpoint, shape=args.shape, layers=args.layers, dtype=args.dtype,
                         prefill=parse_prefill(args.prefill), decode_batch=args.decode_batch,
                         decode_tokens=args.decode_tokens, permuted=args.permuted,
                         candidates=tuple(c for c in args.candidates.split(",") if c))
    problem = speed_problem()
    if problem:
        print(f"permsparse: error: {problem}", file=sys.stderr)
        return 2
    result = measure_speed(config)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="permsparse", description=__doc__.splitlines()[0])
    from importlib.metadata import version

    parser.add_argument("--version", action="version", version=version("permsparse"))
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prune(sub)
    _add_eval(sub)
    _add_check(sub)
    _add_report(sub)
    _add_speed(sub)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    args.command_line = "permsparse " + shlex.join(argv)
    quiet = getattr(args, "quiet", False) and hf_logging.is_progress_bar_enabled()
    if quiet:  # Hugging Face's own bars too (loading weights, writing shards)
        hf_logging.disable_progress_bar()
    try:
        return {"prune": run_prune, "eval": run_eval, "check": run_check, "report": run_report,
                "speed": run_speed}[args.command](args)
    except MemoryError as err:
        print(f"permsparse: error: out of memory: {err or 'lower --batch, --seqlen or --nsamples'}", file=sys.stderr)
        return 2
    except USER_ERRORS as err:
        print(f"permsparse: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("permsparse: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
        distributed.finish()


if __name__ == "__main__":
    sys.exit(main())
