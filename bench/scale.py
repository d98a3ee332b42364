"""Cost of the learned permutation against model width, depth, batch and sequence length.

Each row prunes one model with the e2e learned permutation for a few training steps (identity start, so
no search cost enters), in its own process, and records the seconds per training step (the learning
seconds over the steps, judgments included) and the peak memory (RSS on the CPU, allocated memory on a
GPU). Rows: the real SmolLM2-135M at several batch sizes and sequence lengths, with and without
per-block recomputation, and random-weight models of LLaMA-3.2-1B's and LLaMA-2-7B's block shapes with
few layers (the cost per block times the real depth projects the whole model). With ``--device cuda``
the same rows run on the GPU in bfloat16.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

from common import print_table, save_json

SHAPES = {  # hidden, MLP, heads, kv heads, real depth
    "llama-3.2-1b": (2048, 8192, 32, 8, 16),
    "llama-2-7b": (4096, 11008, 32, 32, 32),
}


@dataclass
class ScaleRow:
    label: str
    model: str  # "smollm2-135m" or a key of SHAPES
    layers: int  # for random shapes: layers built (the projection scales to the real depth)
    batch: int
    seqlen: int
    recompute: bool
    steps: int
    device: str


def _run(row: ScaleRow) -> dict:
    import torch

    from permsparse import Calibration, Learned, PruneConfig, load_model, prune
    from permsparse.report import peak_rss_mb

    dtype = torch.bfloat16 if row.device == "cuda" else torch.float32
    if row.model in SHAPES:
        from transformers import LlamaConfig, LlamaForCausalLM

        hidden, ffn, heads, kv, _ = SHAPES[row.model]
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads,
                                             num_key_value_heads=kv, num_hidden_layers=row.layers, vocab_size=32000,
                                             max_position_embeddings=max(row.seqlen, 2048))).to(dtype).eval()
        vocab = 32000
    else:
        model, tokenizer = load_model(row.model, dtype)
        vocab = model.get_input_embeddings().num_embeddings
    model.to(row.device)
    if row.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, vocab, (row.batch * 2, row.seqlen), generator=gen)
    holdout = torch.randint(0, vocab, (row.batch, row.seqlen), generator=gen)
    config = PruneConfig(permutation=Learned(init="none", steps=row.steps, batch=row.batch, judge_every=row.steps,
                                             recompute=row.recompute),
                         calibration=Calibration(nsamples=len(windows), seqlen=row.seqlen, holdout=len(holdout)))
    started = time.perf_counter()
    report = prune(model, None, config, windows=windows, holdout=holdout, progress=False)
    (record,) = report.training
    result = {"label": row.label, "model": row.model, "layers": row.layers, "batch": row.batch, "seqlen": row.seqlen,
              "recompute": row.recompute, "steps": row.steps, "device": row.device,
              "step_s": record.seconds / row.steps, "prune_s": time.perf_counter() - started,
              "peak_mb": (torch.cuda.max_memory_allocated() / 2**20 if row.device == "cuda" else peak_rss_mb())}
    if row.model in SHAPES:
        depth = SHAPES[row.model][4]
        result["projected_step_s"] = result["step_s"] * depth / row.layers
    return result


def main() -> None:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", nargs="*", default=None, help="only these labels")
    args = parser.parse_args()
    d = args.device
    rows = [ScaleRow("smollm2, 2 x 512", "smollm2-135m", 30, 2, 512, False, args.steps, d),
            ScaleRow("smollm2, 2 x 512, recompute", "smollm2-135m", 30, 2, 512, True, args.steps, d),
            ScaleRow("smollm2, 1 x 512", "smollm2-135m", 30, 1, 512, False, args.steps, d),
            ScaleRow("smollm2, 4 x 512", "smollm2-135m", 30, 4, 512, False, args.steps, d),
            ScaleRow("smollm2, 2 x 2048, recompute", "smollm2-135m", 30, 2, 2048, True, args.steps, d),
            ScaleRow("llama-3.2-1b shape, 2 of 16 layers, 1 x 512", "llama-3.2-1b", 2, 1, 512, True, args.steps, d),
            ScaleRow("llama-2-7b shape, 1 of 32 layers, 1 x 512", "llama-2-7b", 1, 1, 512, True, args.steps, d)]
    if args.rows is not None:
        rows = [r for r in rows if r.label in args.rows]
    results = []
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn"), max_tasks_per_child=1) as pool:
        for row in rows:  # one at a time: timings must not share the machine
            result = pool.submit(_run, row).result()
            print(f"  {result['label']}: {result['step_s']:.2f} s per step, peak {result['peak_mb']:.0f} MB", flush=True)
            results.append(result)
    print_table(results, [("label", "row", ""), ("step_s", "s per step", ".2f"), ("projected_step_s", "s per step "
                                                                                                     "(real depth)", ".2f"),
                          ("peak_mb", "peak MB", ".0f")])
    print(f"saved {save_json('scale' if d == 'cpu' else 'scale_gpu', vars(args), results)}")


if __name__ == "__main__":
    main()
