"""The commands of the ``permsparse`` command line, run once :mod:`permsparse.cli` has parsed their arguments.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path


from ..data import text as data
from ..run import distributed
from ..config import VLM_TASK
from ..checkpoint.check import check_checkpoint
from ..checkpoint.digest import record_digest
from ..checkpoint.load import load
from ..checkpoint.destination import check_free_space, claimed
from ..checkpoint.save import check_export, check_output_free, export_checkpoint, partial_dir
from .arguments import given
from ..config import ExportConfig, Placement, PruneConfig
from ..evaluate.measures import embedding_similarity, perplexity, sentence_similarity
from ..data.images import TEST_SPLITS, accuracy, evaluation_images, is_classifier, is_image_source, reads_images
from .limits import check_context, output_bytes
from ..models.loading import is_vlm, load_model, load_preprocessor, text_tokenizer
from ..run.placement import compute_device, compute_dtype, input_device, place
from ..run.resume import saved_notes
from ..serial import to_dict
from ..per_tower import tower_source

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


def _tasks(spec: str) -> list[str]:
    """Task names from a comma-separated list, checked before any long work."""
    tasks = [t for t in spec.split(",") if t]
    if tasks:
        from ..evaluate.zeroshot import TASKS

        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
    return tasks


def run_report(args) -> int:
    from ..checkpoint.compare import write_report  # matplotlib only for this command

    print(f"wrote {write_report(args.folders, args.out, labels=args.label, title=args.title)}")
    return 0


def run_prune(args) -> int:
    tasks = _tasks(args.eval_tasks)
    config = args.config
    export = ExportConfig(**given(args, ExportConfig))
    if "fallback" in given(args, ExportConfig) and export.format != "folded":
        raise ValueError(f"--fold-fallback only applies to --export folded, not --export {export.format}")
    if args.eval_limit is not None and not tasks:
        raise ValueError("--eval-limit only applies with --eval-tasks")
    check_export(export, config)
    check_output_free(args.out, args.overwrite)
    distributed.initialise()  # under torchrun: rank 0 logs, evaluates and writes; every rank prunes
    placement = Placement(**given(args, Placement))
    device = compute_device(placement.device)  # this process's (after initialise: cuda:LOCAL_RANK under torchrun)
    dtype = compute_dtype(args.dtype, device)
    main_rank = distributed.is_main()
    staging = partial_dir(args.out)
    with claimed(staging, args.out, fresh=args.overwrite and main_rank, lock=main_rank):
        distributed.barrier()
        _logging(staging / "log.txt" if main_rank else None, quiet=not main_rank)
        try:
            return _prune_claimed(args, config, export, tasks, placement, device, dtype, staging)
        finally:
            _logging()  # the run's log.txt closed, whether it is kept or not


def _prune_claimed(args, config: PruneConfig, export: ExportConfig, tasks: list[str], placement: Placement, device,
                   dtype, staging: Path) -> int:
    """``prune`` once its output folder is claimed: load, check the limits, prune, evaluate, export."""
    from ..pipeline import prune

    main_rank = distributed.is_main()
    log.info("%s", args.command_line)
    log.info("config: %s", json.dumps(to_dict(config)))
    log.info("device %s (--device %s), dtype %s", device, placement.device, str(dtype).removeprefix("torch."))
    model, tokenizer = load_model(args.model, dtype)  # a vision-language model: its processor
    check_context(model, config.calibration.seqlen, "--seqlen")
    if main_rank:
        check_free_space(staging, output_bytes(model, config), "the checkpoint and the run's progress")
    notes = saved_notes(staging / ".resume")
    if notes:
        log.info("resuming from %s: %s", staging, "; ".join(notes))
    texts = [t for t in args.eval_texts.split(",") if t]
    text_only = text_tokenizer(tokenizer)
    if args.eval_windows != 0 and not reads_images(model) and config.towers != "vision":
        for text in texts:
            data.check_disjoint(text_only, tower_source(config.calibration.source, "language") if is_vlm(model)
                                else config.calibration.source, text, config.calibration.seqlen, args.eval_windows)
    report = prune(model, tokenizer, config, state_dir=staging / ".resume", progress=not args.quiet and main_rank,
                   placement=placement, allow_dense=args.allow_dense)
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
    if report.kept_dense:
        reasons: dict[str, int] = {}
        for why in report.kept_dense.values():
            reasons[why] = reasons.get(why, 0) + 1
        log.info("kept dense: %d parameters of no linear layer (%s)", len(report.kept_dense),
                 "; ".join(f"{count} x {why}" for why, count in reasons.items()))
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
        from ..evaluate.zeroshot import format_table, zero_shot

        zero_shot_results = zero_shot(model, text_only, tasks, limit=args.eval_limit, progress=not args.quiet)
        log.info("%s", format_table(zero_shot_results))
    export_checkpoint(model, tokenizer, args.out, config, report, export=export, model_name=args.model,
                      metrics=metrics, zero_shot=zero_shot_results, command=args.command_line, overwrite=args.overwrite,
                      in_place=True)
    log.info("saved %s (%.1f s pruning, peak RSS %.0f MB); record digest %s", args.out, report.seconds,
             report.peak_rss_mb, record_digest(args.out))
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
    from ..discover.adapters import adapter_for

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
    from ..evaluate.vlm import evaluate

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
        from ..checkpoint.record import read_record

        model = load(args.model, dtype=dtype)
        tokenizer = load_preprocessor(args.model, model)
        dense_name = read_record(args.model).model
    else:
        model, tokenizer = load_model(args.model, dtype)
    if args.windows != 0 and args.task is None:
        check_context(model, args.seqlen, "--seqlen")
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
        from ..evaluate.zeroshot import format_table, zero_shot

        results = zero_shot(model, tokenizer, tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                            progress=not args.quiet)
        print(format_table(results))
        out["zero_shot"] = to_dict(results)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def run_check(args) -> int:
    try:
        report = check_checkpoint(args.folder, device=args.device, tolerance=args.tolerance, expect=args.expect)
    except (FileNotFoundError, ValueError) as err:
        print(f"permsparse: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"permsparse: error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    print("\n".join(report.lines()), file=sys.stdout if report.ok else sys.stderr)
    return 0 if report.ok else 1


def run(args) -> int:
    """Run the parsed command ``args.command``; ``--quiet`` silences Hugging Face's own bars for its call only."""
    from transformers.utils import logging as hf_logging

    quiet = getattr(args, "quiet", False) and hf_logging.is_progress_bar_enabled()
    if quiet:  # Hugging Face's own bars too (loading weights, writing shards)
        hf_logging.disable_progress_bar()
    try:
        return {"prune": run_prune, "eval": run_eval, "check": run_check, "report": run_report,
                "speed": run_speed}[args.command](args)
    finally:
        if quiet:
            hf_logging.enable_progress_bar()
        distributed.finish()


def run_speed(args) -> int:
    from ..deploy.speed import SpeedConfig, format_table, measure_speed, parse_prefill, speed_problem

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


def kept(args) -> str:
    """What an interrupted prune leaves to resume from, in words (nothing for other commands)."""
    out = getattr(args, "out", None)
    if args.command != "prune" or out is None or not saved_notes(partial_dir(out) / ".resume"):
        return ""
    return f" ({partial_dir(out)} keeps the progress: rerun the same command to resume)"


def describe_os_error(err: OSError) -> str:
    """One line for an OS error: its text and the file it concerns."""
    if not err.strerror:
        return str(err)
    return f"{err.strerror}: {err.filename}" if err.filename else err.strerror
