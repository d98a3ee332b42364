"""Cost of the weight-updating hosts (SparseGPT, ADMM) per linear layer, projected to a whole model.

For each linear shape of a model (``--shapes``: LLaMA-2-7B's, or SmolLM2-135M's to compare with the
pipeline's measured seconds), a weight with random entries and a Hessian ``H = X^T X`` of random
correlated inputs are built on ``--device``; then one 2:4 update of each host is timed (after a warm-up
on a small layer), and the accumulation of ``H`` over one batch of ``--batch-tokens`` calibration tokens
as :mod:`permsparse.sparsity.statistics` does it (float32 product, float64 sum). The projection multiplies each
shape's seconds by its count in the model (per layer: q, k, v, o, gate, up, down; one Hessian per
shared input) and by the layers; it leaves out the forward passes of the blocks, which every host shares.
The update's cost does not depend on the values, only on the shapes and the fixed iteration counts
(SparseGPT: one pass; ADMM: 20 iterations and 10 refining steps, which may stop earlier).
Prints a table and writes ``bench/results/update_cost.json`` (one section per device and shape set).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing
RESULTS = Path(__file__).resolve().parent / "results" / "update_cost.json"

# name -> (layers, hidden, intermediate): every decoder layer has q, k, v, o (hidden x hidden; k and v
# as wide as q for these two), gate and up (intermediate x hidden) and down (hidden x intermediate)
MODELS = {"llama-2-7b": (32, 4096, 11008), "smollm2-135m": (30, 576, 1536)}


def shapes_of(model: str) -> list[dict]:
    """The model's distinct linears: (out, in), how many per layer, and which input (Hessian) they read."""
    _, hidden, inter = MODELS[model]
    return [{"name": "q/k/v", "shape": (hidden, hidden), "per_layer": 3, "input": "attention input"},
            {"name": "o", "shape": (hidden, hidden), "per_layer": 1, "input": "attention output"},
            {"name": "gate/up", "shape": (inter, hidden), "per_layer": 2, "input": "MLP input"},
            {"name": "down", "shape": (hidden, inter), "per_layer": 1, "input": "MLP hidden"}]


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str):
    """``fn()`` and the seconds it took, the device's queued work included."""
    _sync(device)
    started = time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.perf_counter() - started


def _inputs(cols: int, tokens: int, device: str, generator):
    """Random inputs with correlated channels and uneven scales, as activations have."""
    import torch

    mix = torch.randn(cols, cols, generator=generator).div_(cols ** 0.5).to(device)
    scale = torch.rand(cols, generator=generator).mul_(3).exp_().to(device)
    z = torch.randn(tokens, cols, generator=generator).to(device)
    return (z @ mix + 0.5 * z) * scale


def measure(model: str, device: str, batch_tokens: int, hessian_tokens: int, seed: int) -> dict:
    import torch

    from permsparse.update import admm, sparsegpt

    generator = torch.Generator().manual_seed(seed)
    warm_w = torch.randn(256, 256, generator=generator).to(device)
    warm_x = _inputs(256, 1024, device, generator)
    for host in (sparsegpt, admm):  # first calls pay for kernels and libraries
        host(warm_w, (warm_x.T @ warm_x).double(), 2, 4)
    layers, _, _ = MODELS[model]
    rows, hessian_s = [], {}
    for entry in shapes_of(model):
        out, cols = entry["shape"]
        x = _inputs(cols, hessian_tokens, device, generator)
        batch = x[:batch_tokens]
        if cols not in hessian_s:
            gram = torch.zeros(cols, cols, dtype=torch.float64, device=device)
            hessian_s[cols] = _timed(lambda: gram.add_((batch.T @ batch).double()), device)[1]
        hessian = (x.T @ x).double()
        weight = (torch.randn(out, cols, generator=generator) * 0.02).to(device)
        row = {"linear": entry["name"], "out": out, "in": cols, "per_layer": entry["per_layer"],
               "hessian_batch_s": hessian_s[cols]}
        for name, host in (("sparsegpt", sparsegpt), ("admm", admm)):
            result, row[f"{name}_s"] = _timed(lambda: host(weight, hessian, 2, 4), device)
            row[f"{name}_rel_error"] = result.error / float(((weight @ hessian.float()) * weight).sum())
        rows.append(row)
        print(f"{model} {entry['name']:8s} {out:6d} x {cols:6d}: sparsegpt {row['sparsegpt_s']:8.3f} s, admm "
              f"{row['admm_s']:8.3f} s, H batch of {batch_tokens} tokens {row['hessian_batch_s']:.4f} s", flush=True)
    per_layer = {name: sum(r[f"{name}_s"] * r["per_layer"] for r in rows) for name in ("sparsegpt", "admm")}
    hessian_per_layer_batch = sum(r["hessian_batch_s"] for r in rows)  # one Hessian per distinct input
    return {"model": model, "layers": layers, "device": device, "rows": rows,
            "projection": {f"{name}_model_s": per_layer[name] * layers for name in per_layer}
            | {"hessian_per_batch_model_s": hessian_per_layer_batch * layers}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama-2-7b", choices=sorted(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--batch-tokens", type=int, default=2048, help="tokens per Hessian accumulation step")
    parser.add_argument("--hessian-tokens", type=int, default=8192, help="random tokens the timed Hessians are built from")
    parser.add_argument("--calib-tokens", type=int, default=128 * 2048, help="calibration tokens of the projection")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU; nothing was measured")
    result = measure(args.shapes, args.device, args.batch_tokens, args.hessian_tokens, args.seed)
    proj = result["projection"]
    batches = args.calib_tokens / args.batch_tokens
    proj["calib_tokens"] = args.calib_tokens
    proj["hessian_model_s"] = proj["hessian_per_batch_model_s"] * batches
    print(f"\nprojection for {args.shapes} ({result['layers']} layers) on {args.device}, 2:4, "
          f"{args.calib_tokens} calibration tokens:")
    for name in ("sparsegpt", "admm"):
        total = proj[f"{name}_model_s"] + proj["hessian_model_s"]
        print(f"  {name:9s}: updates {proj[f'{name}_model_s'] / 60:7.1f} min + Hessians "
              f"{proj['hessian_model_s'] / 60:6.1f} min = {total / 3600:6.2f} h")
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data[f"{args.shapes} on {args.device.split(':')[0]}"] = {
        "command": "python3 " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        **result}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
