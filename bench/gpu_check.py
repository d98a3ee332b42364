"""One prepared check of the pipeline on one CUDA GPU: at most 8 minutes on an H100 or H200, one table, one JSON.

Parts, in order, each in its own process with its own time limit (a part that runs out is recorded as such,
and the rest still run):

1. ``tests``: the ``gpu`` tests (tests/test_gpu.py, tests/test_resume.py): pruning on the GPU gives the CPU's
   masks and permutations for three families, every permutation method and every host; offloaded blocks give
   the whole model's result; checkpoints pruned on the GPU reload on the CPU to the same logits.
2. ``1b learned``: the learned default (``permsparse prune --perm learned``: e2e, 20 steps of one window, RIA
   start, 32 x 512 calibration windows and 8 held out) on a random-weight LLaMA-3.2-1B (all 16 layers, bfloat16,
   random tokens standing in for text), then the masked export; seconds per stage and peak GPU memory.
3. ``8b blockwise`` and ``8b e2e``: the same defaults (blockwise, and e2e with ``--recompute``) on the
   LLaMA-3.1-8B shape with 4 of its 32 layers; every stage that works block by block is projected to 32 layers
   (times 8), the rest (calibration, the head) kept; peak memory projected from the per-block part.
4. ``8b searches``: seconds per linear of each search (ria, cp, output) at the 8B shapes (q: 4096 x 4096,
   gate: 14336 x 4096, down: 4096 x 14336) on the GPU.
5. ``70b offload``: one LLaMA-3-70B-shape block learned blockwise from the identity (no search: RIA's
   assignments at 28,672 channels alone outlast the budget) with ``--offload on`` (the blocks wait on the
   host); projected to 80 blocks on one GPU, and on 8 GPUs (torchrun: each rank holds an eighth of the
   windows, so statistics and learning divide by 8), searches not included.

Besides, the memory estimate of the whole 8B model's e2e run (built on the meta device, no weights) says
whether it fits the GPU. Without a CUDA GPU the script prints why in one line and exits 2. Writes
bench/results/gpu_check.json (after every part, so a run stopped from outside keeps what it measured).

``--dry-run`` runs every part's code path at tiny shapes (a 2-block LLaMA of width 64, 4 windows of 32
tokens, 2 learning steps, searches of 64 x 128 linears), on ``--device cpu`` too (without offloading there:
the CPU has no host to offload to), writes each part's output to a temporary file unless ``--out`` names one,
and exits 1 when a part failed: the CPU rehearsal of the lent machine (``make rehearse``) runs it.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PERMSPARSE_CACHE", tempfile.gettempdir() + "/permsparse-cache")
RESULTS = ROOT / "bench" / "results" / "gpu_check.json"

BLOCK_STAGES = ("statistics", "search", "learning", "pruning")  # stages that grow with the number of blocks
LIMITS = {"tests": 90, "1b learned": 120, "8b blockwise": 85, "8b e2e": 85, "8b searches": 65, "70b offload": 35}
DRY_LIMIT = 300  # seconds per part of a dry run: tiny shapes; only a hang runs out
# The dry run's model: every LLaMA shape's structure (grouped-query attention, untied head), tiny
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, tie_word_embeddings=False, max_position_embeddings=256)
DRY_CALIBRATION = dict(nsamples=4, seqlen=32, holdout=2, batch_size=4)
DRY_SEARCHES = {"q 64x64": (64, 64), "gate 128x64": (128, 64), "down 64x128": (64, 128)}


@dataclass(frozen=True)
class Setup:
    """Where the parts run, and whether at the real shapes or at the dry run's tiny ones."""

    device: str = "cuda"
    dry_run: bool = False

    def fields(self, shape: str) -> dict:
        """The LlamaConfig fields of ``shape`` (a name of :data:`permsparse.deploy.speed.SHAPES`); tiny ones in a
        dry run."""
        from permsparse.deploy.speed import SHAPES

        return dict(TINY) if self.dry_run else dict(SHAPES[shape])

    def blocks(self, layers: int) -> int:
        """Blocks that run: ``layers``, at most 2 in a dry run."""
        return min(layers, 2) if self.dry_run else layers

    def config(self, learned_options: dict):
        """The learned default with ``learned_options``: in a dry run 2 steps on 4 windows of 32 tokens."""
        from permsparse import Calibration, Learned, PruneConfig

        if not self.dry_run:
            return PruneConfig(permutation=Learned(**learned_options))
        return PruneConfig(permutation=Learned(**{"steps": 2, **learned_options}),
                           calibration=Calibration(**DRY_CALIBRATION))

    def offload(self, offload: str) -> str:
        """``offload``, except on the CPU (no host and device to split)."""
        return "off" if self.device == "cpu" else offload


def random_llama(fields: dict, layers: int, device: str):
    """A random-weight LLaMA of the LlamaConfig ``fields`` with ``layers`` blocks, made in bfloat16 on
    ``device``: its speed and memory are the real model's, only the values differ; on the meta device it has
    no values at all. Made there in bfloat16, not in float32 on the host and moved: a 70B block's random
    initialisation on the host takes minutes; an offloading run moves the blocks to the host itself."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**fields, "num_hidden_layers": layers})
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)


def estimated_gb(fields: dict, layers: int, config, offload: str) -> float:
    """What the memory estimate says the run of ``config`` holds on the GPU with ``layers`` blocks: the model's
    weights there (offloaded: all but the blocks, and one block) and :func:`permsparse.run.memory.estimate`'s
    parts."""
    import torch

    from permsparse.run.memory import GIB, estimate, resident_bytes

    model = random_llama(fields, layers, "meta")
    calib = config.calibration
    weights = resident_bytes(model)
    if offload == "on":
        weights += resident_bytes(model.model.layers[0]) - resident_bytes(model.model.layers)
    shapes = (torch.zeros(()).expand(calib.nsamples, calib.seqlen), torch.zeros(()).expand(calib.holdout, calib.seqlen))
    return (weights + estimate(model, "model.layers", config, *shapes).total) / GIB


def tokens(vocab: int, count: int, seqlen: int, seed: int):
    import torch

    return torch.randint(0, vocab, (count, seqlen), generator=torch.Generator().manual_seed(seed))


def prune_random(setup: Setup, shape: str, layers: int, learned_options: dict, offload: str = "off",
                 export: bool = False) -> dict:
    """The learned default (with ``learned_options``) on a random model of ``shape`` with ``layers`` blocks
    (:class:`Setup` makes them tiny in a dry run); the report's stages and memory."""
    import torch

    from permsparse import export_checkpoint, prune
    from permsparse.run.placement import Placement

    fields, layers, offload = setup.fields(shape), setup.blocks(layers), setup.offload(offload)
    cuda = setup.device == "cuda"
    model = random_llama(fields, layers, setup.device)
    config = setup.config(learned_options)
    vocab = model.config.vocab_size
    calib = config.calibration
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    report = prune(model, None, config, windows=tokens(vocab, calib.nsamples, calib.seqlen, 1),
                   holdout=tokens(vocab, calib.holdout, calib.seqlen, 2), progress=False,
                   placement=Placement(setup.device, offload=offload))
    out = {"shape": shape, "fields": fields, "layers": layers, "options": learned_options, "offload": offload,
           "seconds": report.seconds, "stages": report.stages, "peak_gb": (report.peak_device_mb or 0) / 1024,
           "resident_gb": torch.cuda.memory_allocated() / 2**30 if cuda else 0.0,
           "search_s_per_site": {site.name.split(".", 3)[-1]: layer.search_seconds
                                 for site in report.sites for layer in report.layers
                                 if layer.site == site.name and layer.name.startswith(f"model.layers.{layers - 1}.")},
           "steps": [len(t.loss) for t in report.training],
           "estimated_gb": estimated_gb(fields, layers, config, offload)}
    if export:
        with tempfile.TemporaryDirectory() as folder:
            started = time.perf_counter()
            export_checkpoint(model, None, Path(folder) / "out", config, report)
            out["stages"]["export"] = time.perf_counter() - started
    return out


def project(setup: Setup, result: dict, depth: int, ranks: int = 1) -> dict:
    """Seconds and peak GPU memory of the whole model (``depth`` blocks) from a run on some of them.

    Seconds: every stage that works block by block scales with the blocks (the head's share of e2e learning
    with them: an overestimate); on ``ranks`` data-parallel GPUs the window-proportional stages (statistics,
    learning) divide by ``ranks``, while every rank runs the same searches. Memory: the measured peak times
    the ratio of the memory estimate at ``depth`` blocks to the estimate at the blocks that ran."""
    scale = depth / result["layers"]
    seconds = {}
    for stage, value in result["stages"].items():
        seconds[stage] = value * (scale if stage in BLOCK_STAGES else 1) / (ranks if stage in ("statistics",
                                                                                                 "learning") else 1)
    estimated = estimated_gb(result["fields"], depth, setup.config(result["options"]), result["offload"])
    peak = result["peak_gb"] * estimated / result["estimated_gb"]
    return {"seconds": sum(seconds.values()), "stages": seconds, "peak_gb": peak, "estimated_gb": estimated}


def part_tests(setup: Setup) -> dict:
    """The ``gpu`` tests (on the CPU all skip: the dry run checks that they are collected and reported). pytest
    runs in this part's process group, which :func:`run_part` kills whole at the part's limit."""
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                           "tests/test_gpu.py", "tests/test_resume.py"], cwd=ROOT, capture_output=True, text=True)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr[-500:]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", summary)}
    failures = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"summary": summary, "counts": counts, "failures": failures[:20], "returncode": done.returncode}


def part_1b(setup: Setup) -> dict:
    return prune_random(setup, "llama-3.2-1b", 16, {}, export=True)


def part_8b(setup: Setup, scope: str) -> dict:
    options = {"scope": "blockwise"} if scope == "blockwise" else {"recompute": True}
    result = prune_random(setup, "llama-3.1-8b", 4, options)
    result["projected"] = project(setup, result, 32 if not setup.dry_run else 2 * result["layers"])
    return result


def part_searches(setup: Setup):
    """Seconds of each search, yielded as they come (a part stopped at its limit keeps what it measured)."""
    import search_speed

    shapes = ("q 4096x4096", "gate 14336x4096", "down 4096x14336")
    if setup.dry_run:
        search_speed.SHAPES.update(DRY_SEARCHES)
        shapes = tuple(DRY_SEARCHES)
    out = {}
    for shape in shapes:
        for method in ("ria", "output", "cp"):
            out[f"{method} {shape}"] = search_speed.search_seconds(method, shape, setup.device)[0]
            yield dict(out)


def part_70b(setup: Setup) -> dict:
    result = prune_random(setup, "llama-3-70b", 1, {"scope": "blockwise", "init": "none"}, offload="on")
    depth = 80 if not setup.dry_run else 2
    result["projected"] = project(setup, result, depth)
    result["projected_8_gpus"] = project(setup, result, depth, ranks=8)
    return result


def estimate_8b() -> dict:
    """What the memory estimate says the whole 8B model's runs hold on the GPU, weights included (a model on
    the meta device: no weights are made)."""
    from permsparse.deploy.speed import SHAPES

    return {label: estimated_gb(SHAPES["llama-3.1-8b"], 32, Setup().config(options), "off")
            for label, options in (("e2e", {}), ("e2e --recompute", {"recompute": True}),
                                   ("blockwise", {"scope": "blockwise"}))}


PARTS = {"tests": part_tests, "1b learned": part_1b, "8b blockwise": lambda setup: part_8b(setup, "blockwise"),
         "8b e2e": lambda setup: part_8b(setup, "e2e"), "8b searches": part_searches, "70b offload": part_70b}


def _child(name: str, setup: Setup, queue, part: Callable | None = None) -> None:
    os.setsid()  # this part and every process it starts (pytest, its workers) form one group, killed whole
    try:
        result = (part or PARTS[name])(setup)
        if isinstance(result, dict):
            queue.put({"result": result})
            return
        for partial in result:  # a generator: each snapshot replaces the last
            queue.put({"result": partial, "partial": True})
        queue.put({"done": True})
    except BaseException as err:  # noqa: BLE001 - the parent records what failed and goes on
        import traceback

        queue.put({"error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]})


def _kill_group(pid: int) -> None:
    """SIGKILL to the process group ``pid`` leads: the part and whatever it started and left running."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass


def run_part(name: str, limit: float, setup: Setup = Setup(), part: Callable | None = None) -> dict:
    """``PARTS[name]`` (or ``part``, a function of the :class:`Setup` importable by name) in a fresh process
    (its own GPU memory and peak) leading its own process group, stopped after ``limit`` seconds. At the
    limit, and when the part ends, the whole group is killed: a process the part started (pytest) does not
    outlive it, still holding the GPU during the next parts."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(name, setup, queue, part))
    started = time.perf_counter()
    process.start()
    out: dict = {}
    deadline = started + limit
    while True:  # the child's messages, until it is done or runs out of time
        try:
            message = queue.get(timeout=max(deadline - time.perf_counter(), 0.01))
        except Exception:  # noqa: BLE001 - queue.Empty: out of time
            out.setdefault("error", f"stopped after its limit of {limit:.0f} s")
            break
        if message.pop("done", False):
            out.pop("partial", None)
            break
        out = message
        if "partial" not in out:
            break
    _kill_group(process.pid)
    process.kill()  # in case it was stopped before it led its group
    process.join()
    if not out:
        out = {"error": f"the process ended with code {process.exitcode}"}
    out["wall_s"] = time.perf_counter() - started
    return out


def row(name: str, part: dict) -> str:
    if "result" not in part:
        return f"| {name} | – | – | – | {part['error'][:120]} |"
    r = part["result"]
    if name == "tests":
        return f"| {name} | – | – | – | {r['summary']} |"
    if name == "8b searches":
        stopped = "; the rest stopped at the part's limit" if "error" in part else ""
        return f"| {name} | – | – | – | " + ", ".join(f"{k} {v:.1f} s" for k, v in r.items()) + f"{stopped} |"
    stages = ", ".join(f"{k} {v:.1f}" for k, v in r["stages"].items())
    line = f"| {name} | {sum(r['stages'].values()):.0f} | {r['peak_gb']:.1f} | {stages} |"
    if "projected" in r:
        p = r["projected"]
        line += f" whole model: {p['seconds'] / 60:.1f} min, {p['peak_gb']:.0f} GB"
        if "projected_8_gpus" in r:
            line += f"; on 8 GPUs {r['projected_8_gpus']['seconds'] / 60:.1f} min"
    return line + " |"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="where the parts run (cpu: only with --dry-run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="every part's code path at tiny shapes; exit 1 when a part failed")
    parser.add_argument("--out", help=f"JSON file to write (default: {RESULTS.relative_to(ROOT)}; a dry run: a "
                                      "temporary file)")
    args = parser.parse_args(argv)
    if args.device == "cpu" and not args.dry_run:
        parser.error("--device cpu runs only the dry run (--dry-run): the real shapes need a GPU")
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"bench/gpu_check.py needs a CUDA GPU; torch {torch.__version__} sees none. Nothing was measured.",
              file=sys.stderr)
        return 2
    setup = Setup(args.device, args.dry_run)
    out = Path(args.out or (Path(tempfile.gettempdir()) / "gpu_check_dry_run.json" if args.dry_run else RESULTS))
    out.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    cuda = args.device == "cuda"
    gpu = torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})"
    print(f"{gpu}, torch {torch.__version__}, CUDA {torch.version.cuda}"
          f"{', dry run' if args.dry_run else ''}", flush=True)
    result = {"machine": {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
                          "memory_gb": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
                          "python": platform.python_version()},
              "dry_run": args.dry_run, "date": time.strftime("%Y-%m-%d"), "command": "python3 " + " ".join(sys.argv),
              "estimate_8b_gb": estimate_8b(), "parts": {}}
    parts = result["parts"]
    for name in args.parts:
        parts[name] = run_part(name, DRY_LIMIT if args.dry_run else LIMITS[name], setup)
        print(f"[{time.perf_counter() - began:5.0f} s] {row(name, parts[name])}", flush=True)
        result["seconds"] = time.perf_counter() - began
        out.write_text(json.dumps(result, indent=1, default=str))  # after each part: a stopped run keeps them
    print(f"\n| part | s | peak GB | seconds by stage | notes |\n|---|---|---|---|---|")
    for name, part in parts.items():
        print(row(name, part))
    print(f"\nthe memory estimate of the whole 8B model's runs, weights included (GB): {json.dumps(result['estimate_8b_gb'])}")
    print(f"wrote {out} ({result['seconds']:.0f} s)")
    failed = [name for name, part in parts.items() if "error" in part or part["result"].get("returncode")]
    if args.dry_run and failed:
        print(f"dry run: {len(failed)} part(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
