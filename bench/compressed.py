"""Compressed checkpoints on a real model: bytes on disk, exact reloads, and the memory of a CPU load.

Protocol: the model (default SmolLM2-135M) is pruned once to the pattern (default 2:4, Wanda + RIA
permutations, per-linear binding so no permutation is lost, 16 windows x 512 tokens of C4) and written three
ways, all in bf16: the dense model (``save_pretrained``), the masked export and the compressed export. For
each folder: the weight files' bytes and the folder's bytes; for the compressed one the pruned linears'
stored bytes against their dense bf16 bytes (from its record). Exactness: the logits of the recorded
reference input and of one 512-token window of WikiText-2 valid, compressed ``permsparse.load`` against the
masked folder's ``from_pretrained`` (both bf16), compared bit for bit. Memory: each load runs in a fresh
Python process (after importing torch, transformers and permsparse, whose peak RSS is recorded first),
then one forward pass of the 512-token window; its peak RSS (``VmHWM``, the high-water mark since the
process's exec) is recorded. The target compares
the compressed load's peak with the compressed weight bytes + 1.5x the largest dense linear + what a dense
load costs beyond its weight bytes (the dense load's peak minus its weight bytes). The compressed load is
also probed with glibc's mmap threshold fixed (``MALLOC_MMAP_THRESHOLD_=131072``). Results: ``bench/results/compressed.json``.

    flock /tmp/permsparse-heavy.lock python3 bench/compressed.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import save_json  # noqa: E402

PROBE = r"""
import json, sys, time
import torch, transformers, permsparse
from transformers import AutoModelForCausalLM


def high_water_kb():  # this process's peak RSS since its exec (ru_maxrss would carry the forking parent's)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])


torch.set_num_threads(1)
mode, folder, tokens = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
before = high_water_kb()
start = time.time()
if mode == "compressed":
    model = permsparse.load(folder)
elif mode == "compressed-dense":
    model = permsparse.load(folder, dense=True)
else:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
loaded = high_water_kb()
with torch.no_grad():
    model(torch.tensor([tokens]))
print(json.dumps({"imports_kb": before, "loaded_kb": loaded, "peak_kb": high_water_kb(), "seconds": time.time() - start}))
"""


def folder_bytes(folder: Path) -> tuple[int, int]:
    """Bytes of the weight files and of the whole folder."""
    files = [p for p in folder.iterdir() if p.is_file()]
    return sum(p.stat().st_size for p in files if p.suffix == ".safetensors"), sum(p.stat().st_size for p in files)


def probe(mode: str, folder: Path, tokens: list[int], env: dict[str, str] | None = None) -> dict:
    run = subprocess.run([sys.executable, "-c", PROBE, mode, str(folder), json.dumps(tokens)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, check=True)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return {key.replace("_kb", "_mb"): value / 1024 if key.endswith("_kb") else value for key, value in result.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--perm", default="ria")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--save-as", default="compressed")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from permsparse import Calibration, ExportConfig, PruneConfig, Search, export_checkpoint, load, prune
    from permsparse.discover.adapters import linear_weight
    from permsparse.checkpoint.record import read_record
    from permsparse.checkpoint.reference import model_logits, reference_input
    from permsparse.data.text import bos_id, eval_windows, token_stream
    from permsparse.models import load_model

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench-compressed-"))
    model, tokenizer = load_model(args.model, torch.float32)
    dense_dir = work / "dense"
    model.to(torch.bfloat16).save_pretrained(dense_dir)
    tokenizer.save_pretrained(dense_dir)
    model.to(torch.float32)
    config = PruneConfig(pattern=args.pattern, permutation=Search(args.perm), binding="per-linear",
                         calibration=Calibration(nsamples=args.nsamples))
    start = time.process_time()
    report = prune(model, tokenizer, config, progress=False)
    prune_cpu = time.process_time() - start
    masked = export_checkpoint(model, tokenizer, work / "masked", config, report, model_name=args.model,
                               export=ExportConfig(save_dtype="bfloat16"))
    start = time.process_time()
    compressed = export_checkpoint(model, tokenizer, work / "compressed", config, report, model_name=args.model,
                                   export=ExportConfig("compressed"))
    export_cpu = time.process_time() - start
    largest = max(linear_weight(model.get_submodule(layer.name)).numel() * 2 for layer in report.layers)
    del model

    window = eval_windows(token_stream(tokenizer, "wikitext2-valid"), 512, 1, bos_id(tokenizer))[0].tolist()
    plain = AutoModelForCausalLM.from_pretrained(masked, dtype=torch.bfloat16).eval()
    small = load(compressed)
    record = read_record(compressed)
    reference = reference_input(record.reference)
    exact = {
        "reference input": torch.equal(model_logits(small, reference), model_logits(plain, reference)),
        "wikitext2-valid window": torch.equal(model_logits(small, torch.tensor([window])),
                                              model_logits(plain, torch.tensor([window]))),
    }
    del plain, small
    storage = record.storage
    sizes = {name: folder_bytes(folder) for name, folder in
             (("dense bf16", dense_dir), ("masked bf16", masked), ("compressed bf16", compressed))}
    memory = {"dense bf16 from_pretrained": probe("dense", dense_dir, window),
              "masked bf16 from_pretrained": probe("dense", masked, window),
              "compressed permsparse.load": probe("compressed", compressed, window),
              "compressed permsparse.load(dense=True)": probe("compressed-dense", compressed, window),
              # glibc raises its mmap threshold after each large free, so weights expanded and freed per
              # forward come from a growing heap; a fixed threshold returns them to the system at once
              "compressed permsparse.load, MALLOC_MMAP_THRESHOLD_=131072":
                  probe("compressed", compressed, window, {"MALLOC_MMAP_THRESHOLD_": "131072"}),
              "dense bf16 from_pretrained, MALLOC_MMAP_THRESHOLD_=131072":
                  probe("dense", dense_dir, window, {"MALLOC_MMAP_THRESHOLD_": "131072"})}
    dense_weights = sizes["dense bf16"][0]
    beyond = memory["dense bf16 from_pretrained"]["peak_mb"] - dense_weights / 2**20
    bound = sizes["compressed bf16"][0] / 2**20 + 1.5 * largest / 2**20 + beyond
    result = {
        "model": args.model, "pattern": args.pattern, "perm": args.perm, "nsamples": args.nsamples,
        "prune_cpu_seconds": prune_cpu, "export_compressed_cpu_seconds": export_cpu,
        "pruned_linears": len(report.layers), "pruned_bytes": storage.pruned_bytes,
        "pruned_dense_bf16_bytes": storage.pruned_dense_bf16_bytes, "pruned_ratio": storage.pruned_ratio,
        "folders": {name: {"weights_bytes": w, "folder_bytes": f} for name, (w, f) in sizes.items()},
        "checkpoint_ratio": sizes["compressed bf16"][0] / dense_weights,
        "bitwise_equal_to_masked": exact, "largest_dense_linear_bytes": largest, "memory": memory,
        "rss_bound_mb": bound, "rss_within_bound": memory["compressed permsparse.load"]["peak_mb"] <= bound,
        "rss_within_bound_fixed_mmap_threshold":
            memory["compressed permsparse.load, MALLOC_MMAP_THRESHOLD_=131072"]["peak_mb"] <= bound,
        "work_folder": str(work),
    }
    print(f"pruned linears: {storage.pruned_bytes / 1e6:.2f} MB stored vs {storage.pruned_dense_bf16_bytes / 1e6:.2f} MB "
          f"dense bf16 = {storage.pruned_ratio:.4f} (target <= 0.57)")
    for name, (w, f) in sizes.items():
        print(f"{name:18s} weights {w / 1e6:8.2f} MB   folder {f / 1e6:8.2f} MB")
    print(f"compressed / dense bf16 weights: {result['checkpoint_ratio']:.4f}")
    print("bitwise equal to the masked bf16 export:", exact)
    for name, m in memory.items():
        print(f"{name:58s} imports {m['imports_mb']:7.1f} MB  loaded {m['loaded_mb']:7.1f} MB  peak {m['peak_mb']:7.1f} MB "
              f" ({m['seconds']:.1f} s)")
    print(f"peak RSS bound for the compressed load: {bound:.1f} MB -> {'met' if result['rss_within_bound'] else 'MISSED'}"
          f" (fixed mmap threshold: {'met' if result['rss_within_bound_fixed_mmap_threshold'] else 'MISSED'})")
    print(f"wrote {save_json(args.save_as, {'script': 'bench/compressed.py', **vars(args)}, [result])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
