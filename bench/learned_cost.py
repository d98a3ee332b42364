"""Cost of the blockwise learned permutation on one LLaMA block of a given shape, for projecting large models.

Builds one LLaMA decoder block with random weights (default: LLaMA-2-7B's shape, 4096 hidden, 11008 MLP,
32 heads), random calibration inputs of ``--windows x --seqlen`` tokens, the dense block's outputs, and
runs :func:`permsparse.permute.learned.learn_block` exactly as ``--perm learned --scope blockwise``
does for each block (per-linear binding, identity warm start refined within tiles of 64 channels, host
score magnitude so no statistics pass is needed: the training cost does not depend on the host). Times
``--steps`` steps and a 1-step run, so the per-step and fixed (judging, setup) costs separate; projects
a whole model as ``blocks x`` one block. The warm-start search is not included: its cost at these widths
is ``bench/permutation.py``'s synthetic part. Prints a table and writes bench/results/learned_cost.json.
"""
from __future__ import annotations

import argparse
import time

import torch

from common import save_json


def build(args):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.seqlen,
                         attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        block = LlamaDecoderLayer(config, layer_idx=0).eval()
        rotary = LlamaRotaryEmbedding(config)
    gen = torch.Generator(device=args.device).manual_seed(args.seed)
    inputs = torch.randn(args.windows + args.holdout, args.seqlen, args.hidden, generator=gen, device=args.device)
    positions = torch.arange(args.seqlen, device=args.device).unsqueeze(0)
    kwargs = {"position_embeddings": rotary(inputs[:1], positions), "position_ids": positions}
    return config, block, inputs, kwargs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=32, help="blocks of the projected model")
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--windows", type=int, default=16, help="calibration windows held for the block")
    parser.add_argument("--holdout", type=int, default=8, help="held-out windows the permutations are judged on")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-as", default="learned_cost")
    args = parser.parse_args()

    from permsparse import Calibration, Learned, PruneConfig
    from permsparse.discover.adapters import LLAMA
    from permsparse.sparsity.statistics import run_block
    from permsparse.permute.learned import BlockData, Plan, learn_block
    from permsparse.permute.sites import Site

    config, block, inputs, kwargs = build(args)
    geometry = LLAMA.attention(config)
    targets = run_block(block, inputs, kwargs, batch_size=1)
    count = args.windows
    data = BlockData(inputs[:count], targets[:count], inputs[count:], targets[count:], kwargs)
    names = [name for group in LLAMA.input_groups for name in group]
    rows = []
    for steps in (1, args.steps):
        prune_config = PruneConfig(score="magnitude", permutation=Learned(init="none", scope="blockwise", steps=steps),
                                   calibration=Calibration(nsamples=count, seqlen=args.seqlen, holdout=args.holdout))
        plan = Plan("block", block, dict.fromkeys(names), [Site(name, (name,)) for name in names],
                    {name: torch.arange(block.get_submodule(name).weight.shape[1]) for name in names}, {})
        if args.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        _, record = learn_block(plan, data, prune_config, geometry)
        if args.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
        rows.append({"steps": steps, "seconds": seconds, "peak_gib": peak, "init_judged": record.init_judged,
                     "best_judged": record.best_judged})
        print(f"  {steps} steps: {seconds:.1f} s, peak {peak} GiB, judged {record.init_judged:.4g} -> "
              f"{record.best_judged:.4g}", flush=True)
    per_step = (rows[1]["seconds"] - rows[0]["seconds"]) / max(args.steps - 1, 1)
    block_s = rows[1]["seconds"]
    result = {"per_step_s": per_step, "block_s": block_s, "projected_model_h": block_s * args.blocks / 3600,
              "rows": rows}
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"one {args.hidden}/{args.intermediate} block on {name}, {args.windows} x {args.seqlen} tokens held, "
          f"batch 4 windows: {per_step:.2f} s per step, {block_s:.1f} s for {args.steps} steps; "
          f"{args.blocks} blocks: {result['projected_model_h']:.2f} h")
    print(f"saved {save_json(args.save_as, {**vars(args), 'device_name': name}, [result])}")


if __name__ == "__main__":
    main()
