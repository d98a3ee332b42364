"""2:4 pruning with quantized kept weights on SmolLM2-135M: perplexity, bytes and seconds per row.

Rows: dense; dense int8 and int4 (rtn, gptq: ``--pattern none``); 2:4 SparseGPT + ria, ADMM + ria and
Wanda + none / ria / learned, each with its kept weights unquantized ("16-bit"; the CPU computes in float32),
int8, fp8 (GPTQ), int4 round-to-nearest and int4 GPTQ (groups of ``--group`` permuted inputs: SmolLM2's
width 576 is no multiple of 128, so its rows use 64); and the learned permutation whose objective sees the
fake-quantized int4 weights (``fake_quant``), quantized to int4 GPTQ, against the default learned row.
Every row is the library's pipeline as ``permsparse prune`` runs it (each block pruned, then quantized,
before the next block's inputs are made), on the tool's default calibration (``--calib``, ``--nsamples`` x ``--seqlen``, seed ``--seed``); evaluation on the
first ``--windows`` windows of ``--seqlen`` tokens of each ``--evals`` text (Alpaca's first windows are its
validation text).

Bytes: the pruned linears in the compressed layout (:mod:`permsparse.deploy.format`): the kept values (2
bytes unquantized, 1 int8/fp8, 1/2 int4), 4 bits of positions per group of 4, bfloat16 scales (the quantizers
make them exact in bfloat16) and an int32 input gather per permuted linear (an upper bound: a folded linear
needs none), over the same linears dense in bfloat16; the checkpoint: those plus every other parameter in
bfloat16 (tied embeddings once), over the dense bfloat16 model. These are counted from the quantized records,
not read from an exported folder.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace

from common import EVAL_NAMES, Row, add_protocol_args, print_table, protocol_from, run_spawned, save_json

from permsparse import Calibration, Learned, PruneConfig, Quantization, Search

def kinds(group: int) -> dict[str, Quantization]:
    """The quantizations of every row, int4 in groups of ``group`` inputs."""
    return {"16-bit": Quantization(), "int8": Quantization("int8"), "fp8": Quantization("fp8"),
            "int4 rtn": Quantization("int4", group, method="rtn"), "int4 gptq": Quantization("int4", group)}


def rows_for(args) -> list[Row]:
    base = dict(calibration=Calibration(source=args.calib, nsamples=args.nsamples, seqlen=args.seqlen, seed=args.seed))
    KINDS = kinds(args.group)
    rows = [Row("dense", None)]
    dense = PruneConfig(pattern="none", **base)
    rows += [Row(f"dense | {kind}", replace(dense, quant=KINDS[kind])) for kind in ("int8", "int4 rtn", "int4 gptq")]
    pruned = {"2:4 sparsegpt + ria": PruneConfig(score="sparsegpt", permutation=Search("ria"), **base),
              "2:4 admm + ria": PruneConfig(score="admm", permutation=Search("ria"), **base),
              "2:4 wanda": PruneConfig(**base),
              "2:4 wanda + ria": PruneConfig(permutation=Search("ria"), **base),
              "2:4 wanda + learned": PruneConfig(permutation=Learned(), **base)}
    rows += [Row(f"{label} | {kind}", replace(config, quant=quant)) for label, config in pruned.items()
             for kind, quant in KINDS.items()]
    rows.append(Row("2:4 wanda + learned for int4 | int4 gptq",
                    PruneConfig(permutation=Learned(fake_quant=True), quant=KINDS["int4 gptq"], **base)))
    return rows


def layout_bytes(model, report, config) -> dict:
    """Bytes of the pruned linears in the compressed layout and of the checkpoint, against dense bfloat16."""
    from permsparse.quant import quantized_linears

    quantized = quantized_linears(model)
    value_bytes = {"int8": 1.0, "fp8": 1.0, "int4": 0.5}
    pruned, dense_pruned = 0.0, 0.0
    names = [layer.name for layer in report.layers]
    for name in names:
        out, width = model.get_submodule(name).weight.shape
        q = quantized.get(name)
        per_value = 2.0 if q is None else value_bytes[q.kind]
        share = 1.0 if config.nm is None else config.nm[0] / config.nm[1]
        size = out * width * share * per_value
        if config.nm is not None:
            size += out * width / 4 * 0.5  # 4 bits of positions per group of 4 (2:4)
        if q is not None:
            size += q.scales.numel() * 2 + (0 if q.input_order is None else 4 * width)
        elif report.permutation_of(name) is not None:
            size += 4 * width
        pruned += size
        dense_pruned += 2.0 * out * width
    unique = {id(p): p.numel() for p in model.parameters()}
    total_dense = 2.0 * sum(unique.values())
    return {"pruned_linears_bytes": pruned, "pruned_linears_dense_bf16_bytes": dense_pruned,
            "pruned_linears_ratio": pruned / dense_pruned,
            "checkpoint_bytes": total_dense - dense_pruned + pruned, "checkpoint_dense_bf16_bytes": total_dense,
            "checkpoint_ratio": (total_dense - dense_pruned + pruned) / total_dense}


def run_row(row: Row, args) -> dict:
    import torch

    from permsparse import load_model, perplexity, prune
    from permsparse.data.text import check_disjoint, token_stream
    from permsparse.report import peak_rss_mb
    from permsparse.serial import to_dict

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    result = {"label": row.label, "prune_s": 0.0, "config": None if row.config is None else to_dict(row.config)}
    if row.config is not None:
        for source in args.evals:
            check_disjoint(tokenizer, row.config.calibration.source, source, args.seqlen, args.windows)
        started = time.process_time()
        report = prune(model, tokenizer, row.config, progress=False)
        result.update(prune_s=report.seconds, prune_cpu_s=time.process_time() - started, stages=dict(report.stages),
                      training=to_dict(report.training), unquantized=list(report.unquantized),
                      **layout_bytes(model, report, row.config))
        if report.quantized and report.quantized[0].output_error is not None:
            result["layer_error"] = sum(q.output_error for q in report.quantized) / len(report.quantized)
            result["layer_error_rtn"] = sum(q.output_error_rtn for q in report.quantized) / len(report.quantized)
    result["ppl"] = {}
    for source in args.evals:
        result["ppl"][source] = perplexity(model, tokenizer, seqlen=args.seqlen, windows=args.windows,
                                           ids=token_stream(tokenizer, source), progress=False).ppl
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_protocol_args(parser, evals=("wikitext2", "shakespeare", "alpaca"))
    parser.add_argument("--calib", default=Calibration().source, help="calibration source of every row")
    parser.add_argument("--group", type=int, default=64, help="inputs per int4 scale (must divide every width)")
    parser.add_argument("--save-as", default="quant", help="name of the JSON file under bench/results")
    args = parser.parse_args()
    rows = rows_for(args)
    print(f"2:4 + quantization of {args.model}: calibration {args.nsamples} x {args.seqlen} tokens of {args.calib}, "
          f"seed {args.seed}; evaluation: first {args.windows} windows of {args.seqlen} tokens of "
          f"{', '.join(EVAL_NAMES.get(t, t) for t in args.evals)}", flush=True)
    results = run_spawned(rows, args, run_row,
                          lambda r: f"{r['label']:<52} " + ", ".join(f"{k} {v:.2f}" for k, v in r["ppl"].items()))
    print_table(results, [("label", "method", "")] + [(f"ppl.{t}", f"{t} ppl", ".2f") for t in args.evals]
                + [("pruned_linears_ratio", "linears / bf16", ".3f"), ("checkpoint_ratio", "checkpoint / bf16", ".3f"),
                   ("prune_s", "prune s", ".0f")])
    protocol = {**asdict(protocol_from(args)), "calib": args.calib, "nsamples": args.nsamples, "seed": args.seed,
                "jobs": args.jobs, "group": args.group}
    print(f"saved {save_json(args.save_as, protocol, results)}")


if __name__ == "__main__":
    main()
