"""Choosing the cifar10-vlm testbed's projector recipe on held-out *training* images.

Every candidate (``CANDIDATES``: fields of :class:`permsparse.models.vlm_testbed.Recipe` changed from its
defaults) assembles the testbed from the cached ``cifar10-vit`` and ``smollm2-135m``, trains its projector
on its ``pairs`` training pairs (the recipe's seeded draw, which never holds a held-out image) and is
judged by the ten-way accuracy and caption perplexity on ``--val`` of the recipe's 5,000 held-out training
images. CIFAR-10's test split is not read. Runs on the testbed's two threads, one candidate after another;
each row gives its training seconds per pair, so a candidate's cost at the recipe's ``pairs`` is known.

The chosen recipe becomes :data:`permsparse.models.vlm_testbed.RECIPE`. Prints a table and writes
``bench/results/vlm_testbed_{pairs}.json``. Run here (two CPU threads): ``--pairs 256 --val 300`` (all
three near chance), then ``--pairs 1024 --val 300 --candidates lr1e-3 lr3e-3`` (3e-3 chosen).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing
RESULTS = Path(__file__).resolve().parent / "results"  # vlm_testbed_{pairs}.json

# name -> fields of permsparse.models.vlm_testbed.Recipe changed from its defaults (and ``pairs``: --pairs)
CANDIDATES = {
    "lr3e-4": {"lr": 3e-4},
    "lr1e-3": {"lr": 1e-3},
    "lr3e-3": {"lr": 3e-3},
}


def run(names: list[str], val: int, pairs: int) -> list[dict]:
    import torch
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from permsparse.data.images import Images, load_images
    from permsparse.models.loading import SMOLLM2_ALIAS, cache_dir, load_model
    from permsparse.models.vit_testbed import testbed_folder
    from permsparse.evaluate.vlm import evaluate
    from permsparse.models.vlm_testbed import RECIPE, TRAIN_THREADS, assemble, fit, split

    torch.set_num_threads(TRAIN_THREADS)
    vit_folder = testbed_folder(cache_dir())
    vit = AutoModelForImageClassification.from_pretrained(vit_folder).eval()
    image_processor = AutoImageProcessor.from_pretrained(vit_folder)
    lm, tokenizer = load_model(SMOLLM2_ALIAS)
    train = load_images("cifar10")
    _, held = split(len(train), RECIPE)
    held = held[:val]
    validation = Images(train.pixels[held], train.labels[held], train.classes)
    rows = []
    for name in names:
        recipe = dataclasses.replace(RECIPE, **{"pairs": pairs, **CANDIDATES[name]})
        index, held_out = split(len(train), recipe)
        assert not set(index.tolist()) & set(held.tolist()) and torch.equal(held_out[:val], held)
        started = time.perf_counter()
        model, processor = assemble(vit, lm, tokenizer, image_processor, recipe)
        losses = fit(model, processor, train, recipe, index=index)
        seconds = time.perf_counter() - started
        result = evaluate(model, processor, validation, recipe=recipe)
        row = {"label": name, "recipe": dataclasses.asdict(recipe), "train_s": seconds, "s_per_pair": seconds / len(index),
               "final_loss": sum(losses[-8:]) / len(losses[-8:]), "val_accuracy": result.accuracy,
               "val_caption_ppl": result.caption_ppl, "val_images": result.images, "val_s": result.seconds}
        rows.append(row)
        print(json.dumps(row), flush=True)
        save(rows, pairs)
    return rows


def save(rows: list[dict], pairs: int) -> None:
    import platform

    import torch

    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"command": "python3 " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d"),
              "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
              "rows": rows}
    (RESULTS / f"vlm_testbed_{pairs}.json").write_text(json.dumps(record, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--val", type=int, default=500, help="held-out training images each candidate is judged on")
    parser.add_argument("--pairs", type=int, default=512, help="training pairs of each candidate (a short screen)")
    args = parser.parse_args()
    rows = run(args.candidates, args.val, args.pairs)
    print(f"{'candidate':20s} {'val acc':>8s} {'val ppl':>8s} {'loss':>6s} {'train s':>8s} {'s/pair':>7s}")
    for row in sorted(rows, key=lambda r: -r["val_accuracy"]):
        print(f"{row['label']:20s} {row['val_accuracy']:8.4f} {row['val_caption_ppl']:8.3f} {row['final_loss']:6.3f} "
              f"{row['train_s']:8.0f} {row['s_per_pair']:7.3f}")
    print(f"wrote {RESULTS / f'vlm_testbed_{args.pairs}.json'}")


if __name__ == "__main__":
    main()
