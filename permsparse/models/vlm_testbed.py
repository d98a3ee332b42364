"""An offline vision-language testbed: the CIFAR-10 ViT and SmolLM2-135M joined by a trained projector.

No vision-language model can be downloaded on machines without a hub, so ``--model cifar10-vlm`` builds
one on first use, as LLaVA's first stage does: a frozen vision encoder (the ``cifar10-vit`` testbed of
:mod:`permsparse.models.vit_testbed`, built first if it is not cached), a frozen language model (``smollm2-135m``)
and between them a two-layer MLP projector, the only part trained, on (image, caption) pairs of CIFAR-10's
*training* split. The result is a plain ``LlavaForConditionalGeneration`` folder with its
``LlavaProcessor`` (the ViT's image processor and SmolLM2's tokenizer with an added ``<image>`` token),
cached under ``$PERMSPARSE_CACHE/cifar10-vlm``: ``AutoModelForImageTextToText.from_pretrained`` and
``AutoProcessor.from_pretrained`` load it without any code of ours.

The :class:`Recipe` (seeded, on a fixed two threads):

- image features: the ViT's last layer (``vision_feature_layer=-1``), every token (strategy ``full``:
  the class token, which the ViT was trained to classify from, and the 64 patch tokens), so an image is
  65 ``<image>`` tokens in the text;
- the text: ``PROMPT`` (SmolLM2's chat format, the image in the user's turn), then the caption
  ``"a photo of a {class}."`` as the assistant's answer; the loss is the caption's tokens' alone;
- the ``<image>`` token is a new row of the (tied) embedding, zero: its input embedding is always
  replaced by image features and its output logit is 0, so text without images scores as SmolLM2 did;
- ``pairs`` training images drawn at random (seeded) from the training split less ``holdout`` images
  held out for choosing the hyper-parameters, each seen once with its caption; AdamW over batches, a
  linear warm-up then cosine decay. The learning rate is the best of 3e-4, 1e-3 and 3e-3 on 300 of the
  held-out images (``bench/vlm_testbed.py``; after 1,024 pairs: 46.3% ten-way accuracy at 3e-3, 22.3%
  at 1e-3; after 256 pairs all three were near chance); about 0.19 s a pair on two CPU threads;
- the ViT and the language model frozen (no gradients for their weights).

CIFAR-10's test split is never used for training or for choosing anything; the build records the
ten-way accuracy and caption perplexity of the result on ``test_images`` of its images (seeded) beside
the folder (``testbed.json``, with the recipe and the build's seconds). A cached folder built by another
recipe is built again. Its evaluation: :mod:`permsparse.evaluate.vlm`. Built here (two CPU threads): the
projector trained in 1,550 s; 71.9% ten-way accuracy, caption perplexity 1.158 on 1,000 test images.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..run.cache import replacing
from ..data.images import Images, load_images
from ..run.progress import bar, log
from ..evaluate.vlm import CAPTION, PROMPT, Text, evaluate, text_ids

from ..config import VLM_ALIAS as ALIAS
IMAGE_TOKEN = "<image>"
TRAIN_THREADS = 2
RECORD = "testbed.json"


@dataclass(frozen=True)
class Recipe:
    """How the testbed's projector is trained, and the text it is trained on."""

    prompt: str = PROMPT  # the evaluation task's wording (:mod:`permsparse.evaluate.vlm`)
    caption: str = CAPTION
    vision_feature_layer: int = -1
    vision_feature_select_strategy: str = "full"
    pairs: int = 8192  # (image, caption) pairs, each image seen once
    batch: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup: float = 0.05  # fraction of the steps
    holdout: int = 5000  # training images held out (never trained on) for choosing the above
    test_images: int = 1000  # CIFAR-10 test images scored after the build, for the record
    seed: int = 0


RECIPE = Recipe()


# -- assembling the model ------------------------------------------------------------------------------

def assemble(vit, lm, tokenizer, image_processor, recipe: Recipe = RECIPE):
    """A ``LlavaForConditionalGeneration`` of the ViT ``vit`` (a ``ViTForImageClassification`` or
    ``ViTModel``) and the causal LM ``lm`` (copies of their weights; the classifier head is dropped) with
    a fresh projector (seeded), and its ``LlavaProcessor``. ``tokenizer`` is copied and given the
    ``<image>`` token, the LM's embedding a zero row for it."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    vision = getattr(vit, "vit", vit)
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    vocab = max(lm.config.vocab_size, image_token_id + 1)
    vision_config = vision.config.to_dict()
    for key in ("id2label", "label2id", "architectures", "num_labels"):
        vision_config.pop(key, None)
    text_config = lm.config.to_dict()
    text_config["vocab_size"] = vocab
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
                         vision_feature_layer=recipe.vision_feature_layer,
                         vision_feature_select_strategy=recipe.vision_feature_select_strategy,
                         projector_hidden_act="gelu", multimodal_projector_bias=True,
                         tie_word_embeddings=lm.config.tie_word_embeddings)
    torch.manual_seed(recipe.seed)
    model = LlavaForConditionalGeneration(config)
    dtype = next(lm.parameters()).dtype
    model.to(dtype)
    with torch.no_grad():
        missing, unexpected = model.model.vision_tower.load_state_dict(vision.state_dict(), strict=False)
        if unexpected or any(not k.startswith("pooler.") for k in missing):
            raise ValueError(f"the ViT does not fit the vision tower: missing {missing}, unexpected {unexpected}")
        for name, param in model.model.vision_tower.named_parameters():  # the unused pooler: zero, not random
            if name.startswith("pooler."):
                param.zero_()
        state = {k: v for k, v in lm.model.state_dict().items()}
        embed = state.pop("embed_tokens.weight")
        model.model.language_model.load_state_dict(state, strict=False)
        weights = model.model.language_model.embed_tokens.weight
        weights.zero_()
        weights[:embed.shape[0]] = embed
        if not config.tie_word_embeddings:
            model.lm_head.weight.zero_()
            model.lm_head.weight[:embed.shape[0]] = lm.lm_head.weight
    missing = [k for k in model.model.language_model.state_dict() if k not in lm.model.state_dict()]
    if missing:
        raise ValueError(f"the language model does not fit Llava's: {missing}")
    processor = LlavaProcessor(image_processor=copy.deepcopy(image_processor), tokenizer=tokenizer,
                               patch_size=vision.config.patch_size, num_additional_image_tokens=1,
                               vision_feature_select_strategy=recipe.vision_feature_select_strategy,
                               image_token=IMAGE_TOKEN)
    return model.eval(), processor


def projector_parameters(model) -> list[torch.nn.Parameter]:
    return list(model.model.multi_modal_projector.parameters())


# -- training ------------------------------------------------------------------------------------------

def split(count: int, recipe: Recipe = RECIPE) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training pairs and of the held-out images among ``count`` training images: one
    seeded permutation, the held-out images its last ``holdout``, the pairs its first ``pairs`` (the
    split lists its images class by class, so neither is a slice of it)."""
    order = torch.randperm(count, generator=torch.Generator().manual_seed(recipe.seed))
    holdout = min(recipe.holdout, count // 2)
    pool, held = order[:count - holdout], order[count - holdout:]
    if recipe.pairs > len(pool):
        raise ValueError(f"{recipe.pairs} pairs asked for, {len(pool)} training images left after the held-out ones")
    return pool[:recipe.pairs], held


def batch_inputs(processor, images: Images, index: torch.Tensor, text: Text, pad_id: int = 0):
    """``(input_ids, pixel_values, labels)`` of the indexed images with their captions, right-padded;
    ``labels`` are -100 but on the caption's tokens."""
    from ..data.images import preprocess

    pixels = preprocess(processor.image_processor, images, index)
    rows = [text.context + text.names[int(images.labels[i])] + text.end for i in index]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        labels[r, text.caption_start:len(row)] = ids[r, text.caption_start:len(row)]
    return ids, pixels, labels


def caption_loss(model, ids: torch.Tensor, pixels: torch.Tensor, labels: torch.Tensor, caption_start: int):
    """Mean cross-entropy of the caption tokens (logits computed only where captions are)."""
    keep = ids.shape[1] - caption_start + 1
    parameter = next(model.parameters())
    logits = model(input_ids=ids.to(parameter.device), pixel_values=pixels.to(parameter.device, parameter.dtype),
                   logits_to_keep=keep, use_cache=False).logits
    target = labels[:, -keep + 1:].to(parameter.device)
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def fit(model, processor, images: Images, recipe: Recipe = RECIPE, *, index: torch.Tensor | None = None,
        progress: bool = True) -> list[float]:
    """Train ``model``'s projector (only it) on the captions of ``images`` (those in ``index``; default
    the recipe's training pairs) in the order of ``index``; return each step's loss. ``model`` is left in
    eval mode with every parameter frozen."""
    if index is None:
        index, _ = split(len(images), recipe)
    text = text_ids(processor, images.classes, recipe)
    trained = projector_parameters(model)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in trained:
        param.requires_grad_(True)
    torch.manual_seed(recipe.seed)
    total = math.ceil(len(index) / recipe.batch)
    warmup = max(1, round(recipe.warmup * total))
    optimiser = torch.optim.AdamW(trained, lr=recipe.lr, weight_decay=recipe.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda s: (s + 1) / warmup if s < warmup
        else 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1))))
    pad = processor.tokenizer.pad_token_id or 0
    losses = []
    model.eval()  # no dropout anywhere; the frozen parts stay as they are
    steps = bar(range(total), desc=f"training the {ALIAS} projector", disable=not progress)
    try:
        for step in steps:
            ids, pixels, labels = batch_inputs(processor, images, index[step * recipe.batch:(step + 1) * recipe.batch],
                                               text, pad)
            loss = caption_loss(model, ids, pixels, labels, text.caption_start)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
            if progress and step % 10 == 0:
                steps.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    finally:
        steps.close()
        for param in trained:
            param.requires_grad_(False)
    return losses


# -- building and caching ------------------------------------------------------------------------------

def build(folder: Path, vit, lm, tokenizer, image_processor, train_set: Images, test_set: Images | None = None,
          recipe: Recipe = RECIPE, progress: bool = True, notes: dict | None = None) -> dict:
    """Assemble, train the projector on ``train_set`` and save the testbed into ``folder`` atomically
    (staging folder, then ``os.replace``), with its record (``testbed.json``: the recipe, the seconds,
    the accuracy and caption perplexity on ``recipe.test_images`` images of ``test_set`` if given, and
    ``notes``); return the record."""
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        started = time.perf_counter()
        model, processor = assemble(vit, lm, tokenizer, image_processor, recipe)
        losses = fit(model, processor, train_set, recipe, progress=progress)
        seconds = time.perf_counter() - started
        result = None
        if test_set is not None and recipe.test_images:
            result = evaluate(model, processor, test_set, recipe=recipe, limit=recipe.test_images, progress=progress)
    finally:
        torch.set_num_threads(threads)
    record = {"seconds": seconds, "threads": TRAIN_THREADS, "recipe": asdict(recipe),
              "final_loss": sum(losses[-10:]) / max(len(losses[-10:]), 1), "torch": torch.__version__, **(notes or {})}
    if result is not None:
        record.update(test_accuracy=result.accuracy, test_caption_ppl=result.caption_ppl, test_images=result.images)
    with replacing(folder) as staging:  # a testbed of another recipe is replaced
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        (staging / RECORD).write_text(json.dumps(record, indent=1))
    if result is not None:
        log.info("%s: ten-way accuracy %.4f, caption perplexity %.3f on %d CIFAR-10 test images; projector trained "
                 "in %.0f s on %d threads", ALIAS, result.accuracy, result.caption_ppl, result.images, seconds,
                 TRAIN_THREADS)
    return record


def built_recipe(folder: Path, key: str = "recipe") -> dict | None:
    """The recipe recorded beside a cached testbed (``key``: ``vit_recipe``, the ViT's), or None if there
    is none."""
    try:
        return json.loads((folder / RECORD).read_text()).get(key)
    except (OSError, ValueError):
        return None


def vlm_folder(cache: Path, progress: bool = True) -> Path:
    """The cached testbed folder, built first (the ViT testbed too, if need be) if it is not there yet or
    another recipe built it or its ViT."""
    from .vit_testbed import RECIPE as VIT_RECIPE, testbed_folder

    folder = cache / ALIAS
    if ((folder / "config.json").is_file() and built_recipe(folder) == asdict(RECIPE)
            and built_recipe(folder, "vit_recipe") == asdict(VIT_RECIPE)):
        return folder
    if folder.exists():
        log.info("the cached %s testbed in %s was built by another recipe; building it again", ALIAS, folder)
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .smollm2 import ALIAS as SMOLLM2_ALIAS, load_smollm2

    vit_folder = testbed_folder(cache, progress=progress)
    log.info("building the %s testbed in %s (once; under an hour on 2 cores)", ALIAS, folder)
    vit = AutoModelForImageClassification.from_pretrained(vit_folder).eval()
    image_processor = AutoImageProcessor.from_pretrained(vit_folder)
    lm, tokenizer = load_smollm2(cache)
    lm.eval()
    build(folder, vit, lm, tokenizer, image_processor, load_images("cifar10"), load_images("cifar10-test"),
          progress=progress, notes={"vit_recipe": asdict(VIT_RECIPE), "language_model": SMOLLM2_ALIAS})
    return folder
