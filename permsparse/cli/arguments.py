"""The command line's arguments: every config field as a flag, each command's parser, and the config a
``prune`` command line makes. Nothing here imports torch or transformers, so ``--help`` and argument errors
answer at once."""
from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Literal

from ..config import SMOLLM2_ALIAS, TESTBED_ALIAS, VLM_ALIAS
from ..config import (DTYPES, SEARCH_METHODS, Calibration, Distill, ExportConfig, Learned, Placement, PruneConfig,
                      Quantization, Search)

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
    distill = given(args, Distill)
    if not distill.get("steps") and set(distill) - {"steps"}:
        raise ValueError(f"{_flags_of(Distill, sorted(set(distill) - {'steps'}))} only apply with --distill-steps "
                         "above 0 (no distillation runs without it)")
    config = PruneConfig(permutation=permutation, calibration=Calibration(**given(args, Calibration)),
                         distill=Distill(**distill), quant=Quantization(**given(args, Quantization)),
                         **given(args, PruneConfig))
    if "update_mask" in given(args, PruneConfig) and not config.updates:
        raise ValueError(f"--update-mask only applies to the weight-updating hosts (--score sparsegpt or admm), "
                         f"not --score {config.score}")
    if "compensate" in search and config.permutation.method != "output":
        raise ValueError("--no-compensate only applies to --perm output")
    return config


def add_prune(sub) -> None:
    p = sub.add_parser("prune", help="prune a model to N:M sparsity and save a checkpoint")
    p.add_argument("--model", default=SMOLLM2_ALIAS,
                   help=f"hub id, HF folder, .gguf file, {SMOLLM2_ALIAS!r} or {TESTBED_ALIAS!r} (a CIFAR-10 ViT built here)")
    p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder")
    p.add_argument("--allow-dense", action="store_true",
                   help="save the model even when the pattern prunes none of its linears (refused otherwise)")
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


def add_eval(sub) -> None:
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


def add_check(sub) -> None:
    p = sub.add_parser("check", help="verify a checkpoint: N:M of every pruned linear and the recorded logits")
    p.add_argument("folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tolerance", type=float, default=None,
                   help="relative logits tolerance (default: ours by the weights' dtype, never the checkpoint's)")
    p.add_argument("--expect", default=None, metavar="DIGEST",
                   help="fail unless the record's digest (printed at export and by check) is DIGEST")


def add_report(sub) -> None:
    p = sub.add_parser("report", help="one self-contained HTML page (and PNGs) comparing pruned checkpoints")
    p.add_argument("folders", nargs="+", metavar="DIR", help="permsparse checkpoint folders")
    p.add_argument("--out", default="report", help="output folder: index.html and PNGs (other files stay)")
    p.add_argument("--label", action="append", default=None, help="a label per checkpoint, in order (default: folder names)")
    p.add_argument("--title", default="permsparse report")


def add_speed(sub, full: bool) -> None:
    """The ``speed`` command; its flags (whose choices need torch) only when it is the command given."""
    p = sub.add_parser("speed", help="dense against 2:4 on this GPU: prefill, decode, memory and logit error of a "
                                     "checkpoint or of a random model of a named shape")
    if not full:
        return
    from ..deploy.speed import CANDIDATES, SHAPES

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
