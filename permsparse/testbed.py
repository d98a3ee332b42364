"""An offline vision testbed: a small ViT trained here on the CIFAR-10 training split.

No pretrained vision Transformer can be downloaded on machines without a hub, so ``--model cifar10-vit``
builds one on first use and caches it as a Hugging Face folder (``ViTForImageClassification`` and its
image processor config) under ``$PERMSPARSE_CACHE/cifar10-vit``; later uses load the folder.

Recipe (seeded, deterministic on one machine): 32x32 inputs cut into 4x4 patches (64 tokens and a class
token), hidden 192, 6 layers, 3 heads, MLP 768, no dropout; AdamW (lr 2e-3, weight decay 0.05, betas
0.9/0.999) over batches of 128 with one epoch of linear warm-up then cosine decay, label smoothing 0.1;
random crops of the 4-pixel-padded image and horizontal flips. ``EPOCHS`` epochs; the test-split top-1 of
the result is written beside it (``testbed.json``) and printed.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .images import load_images
from .progress import bar, log

ALIAS = "cifar10-vit"
EPOCHS = 12
BATCH = 128
LR = 2e-3
WEIGHT_DECAY = 0.05
SEED = 0
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


def vit_config():
    from transformers import ViTConfig

    return ViTConfig(image_size=32, patch_size=4, num_channels=3, hidden_size=192, num_hidden_layers=6,
                     num_attention_heads=3, intermediate_size=768, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=10)


def processor():
    from transformers import ViTImageProcessor

    return ViTImageProcessor(do_resize=False, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                             image_mean=list(MEAN), image_std=list(STD))


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return (pixels.float() / 255 - mean) / std


def _augment(pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 32x32 crops of the 4-pixel zero-padded images, and horizontal flips."""
    n = pixels.shape[0]
    padded = F.pad(pixels, (4, 4, 4, 4))
    dx, dy = torch.randint(0, 9, (2, n), generator=generator)
    rows = dy[:, None] + torch.arange(32)
    cols = dx[:, None] + torch.arange(32)
    out = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    flip = torch.rand(n, generator=generator) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def train(folder: Path, epochs: int = EPOCHS, progress: bool = True) -> float:
    """Train the testbed ViT into ``folder`` (written atomically); return its CIFAR-10 test top-1."""
    from transformers import ViTForImageClassification

    torch.manual_seed(SEED)
    model = ViTForImageClassification(vit_config())
    train_set, test_set = load_images("cifar10"), load_images("cifar10-test")
    generator = torch.Generator().manual_seed(SEED)
    steps_per_epoch = len(train_set) // BATCH
    total = epochs * steps_per_epoch
    optimiser = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: (s + 1) / steps_per_epoch if s < steps_per_epoch
        else 0.5 * (1 + math.cos(math.pi * (s - steps_per_epoch) / max(total - steps_per_epoch, 1))))
    started = time.perf_counter()
    steps = bar(range(total), desc=f"training the {ALIAS} testbed", disable=not progress)
    model.train()
    for step in steps:
        if step % steps_per_epoch == 0:
            order = torch.randperm(len(train_set), generator=generator)
        index = order[(step % steps_per_epoch) * BATCH:(step % steps_per_epoch + 1) * BATCH]
        pixels = _normalise(_augment(train_set.pixels[index], generator))
        loss = F.cross_entropy(model(pixel_values=pixels).logits, train_set.labels[index], label_smoothing=0.1)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        steps.set_postfix(loss=f"{loss.item():.3f}", epoch=step // steps_per_epoch + 1)
    steps.close()
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(pixel_values=_normalise(test_set.pixels[s:s + 500])).logits.argmax(-1)
                           == test_set.labels[s:s + 500]).sum()) for s in range(0, len(test_set), 500))
    top1 = correct / len(test_set)
    staging = Path(tempfile.mkdtemp(prefix=f".{ALIAS}-", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        processor().save_pretrained(staging)
        (staging / "testbed.json").write_text(json.dumps(
            {"test_top1": top1, "epochs": epochs, "seconds": time.perf_counter() - started,
             "threads": torch.get_num_threads()}, indent=1))
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("%s: CIFAR-10 test top-1 %.4f after %d epochs (%.0f s)", ALIAS, top1, epochs,
             time.perf_counter() - started)
    return top1


def testbed_folder(cache: Path, progress: bool = True) -> Path:
    """The cached testbed folder, trained first if it is not there yet."""
    folder = cache / ALIAS
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        train(folder, progress=progress)
    return folder
