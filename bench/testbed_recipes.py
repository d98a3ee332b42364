"""Choosing the CIFAR-10 testbed's recipe: candidates trained side by side, judged on held-out training images.

Two parts, each run on its own (they write separate sections of one JSON file):

- ``--train``: every candidate recipe (``CANDIDATES``) trains on 45,000 images of the CIFAR-10 training
  split (a seeded draw) and is judged on the other 5,000, the **validation** images the recipe is chosen
  on; the test split's top-1 is printed beside it for reporting only. Candidates run in their own
  processes, ``--jobs`` at a time, on ``--device`` (``cuda``: all on one GPU; ``cpu``: ``--threads``
  torch threads each). Seconds are wall-clock per candidate, contended when several run at once.
- ``--cpu-cost``: the seconds one training step of each candidate takes here on the CPU with the
  testbed's thread count (the median of ``--steps`` timed steps after warm-up), projected to a whole
  training on the 50,000 training images. The testbed must train within an hour on a 2-core machine.

The chosen recipe becomes :data:`permsparse.models.vit_testbed.RECIPE`, which trains on all 50,000 images.
Prints a table and writes ``bench/results/testbed_recipes.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing
RESULTS = Path(__file__).resolve().parent / "results" / "testbed_recipes.json"
VALIDATION = 5000
TRAIN_IMAGES = 50000

# name -> fields of permsparse.models.vit_testbed.Recipe changed from its defaults
CANDIDATES = {
    "b32 lr1e-3 10ep": {"batch": 32, "lr": 1e-3, "epochs": 10},
    "b32 lr1e-3 18ep": {"batch": 32, "lr": 1e-3, "epochs": 18},
    "b32 lr5e-4 18ep": {"batch": 32, "lr": 5e-4, "epochs": 18},
    "b32 lr1e-3 18ep no smoothing": {"batch": 32, "lr": 1e-3, "epochs": 18, "label_smoothing": 0.0},
    "b128 lr2e-3 18ep": {"batch": 128, "lr": 2e-3, "epochs": 18},
    "b128 lr4e-3 18ep": {"batch": 128, "lr": 4e-3, "epochs": 18},
    "6 layers b128 lr2e-3 14ep": {"layers": 6, "batch": 128, "lr": 2e-3, "epochs": 14},
    "hidden 192 b128 lr2e-3 12ep": {"hidden": 192, "mlp": 384, "batch": 128, "lr": 2e-3, "epochs": 12},
}


def recipe_of(name: str):
    from permsparse.models.vit_testbed import Recipe

    return dataclasses.replace(Recipe(), **CANDIDATES[name])


def _train_one(name: str, data_file: str, device: str, threads: int) -> dict:
    import torch

    from permsparse.models.vit_testbed import fit, top1

    torch.set_num_threads(threads)
    data = torch.load(data_file)
    recipe = recipe_of(name)
    started = time.perf_counter()
    model = fit(recipe, data["train_pixels"], data["train_labels"], progress=False, device=device)
    seconds = time.perf_counter() - started
    return {"label": name, "recipe": dataclasses.asdict(recipe), "device": device, "train_images": len(data["train_labels"]),
            "train_s": seconds, "val_top1": top1(model, data["val_pixels"], data["val_labels"]),
            "test_top1": top1(model, data["test_pixels"], data["test_labels"])}


def _split(seed: int) -> dict:
    """45,000 training and 5,000 validation images of the training split (seeded), and the test split."""
    import torch

    from permsparse.data.images import load_images

    train, test = load_images("cifar10"), load_images("cifar10-test")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val, fit_on = order[:VALIDATION], order[VALIDATION:]
    return {"train_pixels": train.pixels[fit_on], "train_labels": train.labels[fit_on],
            "val_pixels": train.pixels[val], "val_labels": train.labels[val],
            "test_pixels": test.pixels, "test_labels": test.labels}


def train_candidates(names: list[str], device: str, jobs: int, threads: int, seed: int, deadline: float) -> list[dict]:
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_file = os.path.join(tmp, "split.pt")
        torch.save(_split(seed), data_file)
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(_train_one, name, data_file, device, threads): name for name in names}
            try:
                for future in as_completed(futures, timeout=deadline):
                    try:
                        row = future.result()
                    except Exception as err:  # noqa: BLE001 - one failing candidate loses no other
                        row = {"label": futures[future], "error": repr(err)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    save("trained", rows)
            except TimeoutError:
                print(f"deadline of {deadline:.0f} s reached; unfinished: "
                      f"{', '.join(futures[f] for f in futures if not f.done())}", flush=True)
                for process in pool._processes.values():  # noqa: SLF001 - stop the unfinished candidates
                    process.kill()
    return rows


def cpu_cost(names: list[str], threads: int, steps: int) -> list[dict]:
    """Median seconds per training step of each candidate on this CPU, and the projected training seconds."""
    import torch
    import torch.nn.functional as F
    from transformers import ViTForImageClassification

    from permsparse.models.vit_testbed import _augment, _normalise, vit_config

    torch.set_num_threads(threads)
    rows = []
    for name in names:
        recipe = recipe_of(name)
        torch.manual_seed(0)
        model = ViTForImageClassification(vit_config(recipe)).train()
        optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.lr)
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (recipe.batch, 3, 32, 32), dtype=torch.uint8, generator=generator)
        labels = torch.randint(0, 10, (recipe.batch,), generator=generator)
        times = []
        for step in range(steps + 3):
            started = time.perf_counter()
            loss = F.cross_entropy(model(pixel_values=_normalise(_augment(pixels, generator, recipe.crop))).logits, labels)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if step >= 3:
                times.append(time.perf_counter() - started)
        step_s = statistics.median(times)
        total_steps = recipe.epochs * (TRAIN_IMAGES // recipe.batch)
        row = {"label": name, "threads": threads, "step_s": step_s, "steps": total_steps,
               "projected_s": step_s * total_steps}
        rows.append(row)
        print(f"{name:32s} {step_s * 1000:7.1f} ms/step x {total_steps} steps = {row['projected_s']:6.0f} s", flush=True)
    return rows


def save(section: str, rows: list[dict]) -> None:
    import platform

    import torch

    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data[section] = {"command": "python3 " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
                     "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                                 "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
                     "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1))


def print_trained(rows: list[dict]) -> None:
    print(f"{'recipe':32s} {'val top-1':>9s} {'test top-1':>10s} {'train s':>8s}")
    for row in sorted(rows, key=lambda r: -r.get("val_top1", -1)):
        if "error" in row:
            print(f"{row['label']:32s} failed: {row['error']}")
        else:
            print(f"{row['label']:32s} {row['val_top1']:9.4f} {row['test_top1']:10.4f} {row['train_s']:8.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    part = parser.add_mutually_exclusive_group(required=True)
    part.add_argument("--train", action="store_true", help="train every candidate and judge it on validation images")
    part.add_argument("--cpu-cost", action="store_true", help="time each candidate's training step on this CPU")
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per candidate (default: the "
                        "testbed's training thread count)")
    parser.add_argument("--steps", type=int, default=20, help="--cpu-cost: timed steps per candidate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the training/validation split")
    parser.add_argument("--deadline", type=float, default=None, help="--train: stop unfinished candidates after "
                        "this many seconds (what finished is kept)")
    args = parser.parse_args()
    from permsparse.models.vit_testbed import TRAIN_THREADS

    threads = args.threads or TRAIN_THREADS
    if args.train:
        print_trained(train_candidates(args.candidates, args.device, args.jobs, threads, args.seed, args.deadline))
    else:
        save("cpu_cost", cpu_cost(args.candidates, threads, args.steps))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
