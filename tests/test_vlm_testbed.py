"""The cifar10-vlm testbed's builder and its evaluation, on a tiny ViT and a tiny LLaMA (no real build)."""
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from permsparse.cli import main
from permsparse.data.images import Images
from permsparse.models.vit_testbed import processor as vit_processor
from permsparse.evaluate.vlm import VLMAccuracy, evaluate, score_batch, text_ids
from permsparse.models.vlm_testbed import RECIPE, assemble, build, built_recipe, split

from .conftest import tiny_llama, tiny_vit

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# a short prompt and few pairs: the tiny models' runs stay fast
TINY = replace(RECIPE, prompt="<image>\nWhat is it?\n", pairs=12, batch=4, holdout=6, test_images=4, lr=1e-2)


def tiny_images(count: int, seed: int) -> Images:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (count, 3, 32, 32), generator=generator, dtype=torch.uint8)
    return Images(pixels, torch.arange(count) % 10, CLASSES)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_tokenizer):
    """The builder run on tiny stand-ins: its folder, the stand-ins and the record."""
    folder = tmp_path_factory.mktemp("vlm") / "cifar10-vlm"
    vit, lm = tiny_vit(), tiny_llama()
    record = build(folder, vit, lm, tiny_tokenizer, vit_processor(), tiny_images(24, 0), tiny_images(8, 1),
                   recipe=TINY, progress=False)
    return folder, vit, lm, tiny_tokenizer, record


def test_the_built_folder_reloads_with_auto_classes_to_the_same_logits(built):
    folder, vit, lm, tokenizer, record = built
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    assert type(model).__name__ == "LlavaForConditionalGeneration" and type(processor).__name__ == "LlavaProcessor"
    assert record["recipe"] == built_recipe(folder) and record["seconds"] > 0
    assert 0 <= record["test_accuracy"] <= 1 and record["test_caption_ppl"] > 1 and record["test_images"] == 4
    image = tiny_images(1, 5).pixels[0].permute(1, 2, 0).numpy()
    inputs = processor(text=TINY.prompt + "a photo of a cat.", images=image, return_tensors="pt")
    image_id = model.config.image_token_id
    assert int((inputs["input_ids"] == image_id).sum()) == (32 // 8) ** 2 + 1  # the class token and 16 patches
    # the same model assembled and trained again in memory: the build is deterministic and the save exact
    again, again_processor = assemble(vit, lm, tokenizer, vit_processor(), TINY)
    from permsparse.models.vlm_testbed import fit

    fit(again, again_processor, tiny_images(24, 0), TINY, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, again(**inputs).logits, rtol=0, atol=0)
    assert torch.equal(again_processor(text=TINY.prompt, images=image, return_tensors="pt")["input_ids"],
                       processor(text=TINY.prompt, images=image, return_tensors="pt")["input_ids"])


def test_only_the_projector_changed(built):
    folder, vit, lm, tokenizer, _ = built
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    tower = model.model.vision_tower.state_dict()
    for name, weight in vit.vit.state_dict().items():
        assert torch.equal(tower[name], weight), name
    assert all(not tower[n].any() for n in tower if n.startswith("pooler."))  # unused: zero
    language = model.model.language_model.state_dict()
    for name, weight in lm.model.state_dict().items():
        if name == "embed_tokens.weight":
            rows = weight.shape[0]
            assert torch.equal(language[name][:rows], weight) and not language[name][rows:].any()
        else:
            assert torch.equal(language[name], weight), name
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    fresh, _ = assemble(vit, lm, tokenizer, vit_processor(), TINY)
    trained = model.model.multi_modal_projector.state_dict()
    assert all(not torch.equal(trained[n], w) for n, w in fresh.model.multi_modal_projector.state_dict().items())


def test_text_without_images_scores_as_the_language_model_did(built):
    folder, _, lm, _, _ = built
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vlm, dense = model(input_ids=ids).logits, lm(ids).logits
    torch.testing.assert_close(vlm[..., :512], dense, rtol=1e-5, atol=1e-5)
    assert torch.equal(vlm[..., 512:], torch.zeros_like(vlm[..., 512:]))  # the <image> token's logit


def test_eval_scores_every_class_name_as_a_full_forward_pass_does(built):
    folder, *_ = built
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    images = tiny_images(3, 7)
    text = text_ids(processor, CLASSES, TINY)
    assert any(len(n) > 1 for n in text.names)  # the tiny tokenizer splits names: the cached path runs
    pixels = processor.image_processor([p.permute(1, 2, 0).numpy() for p in images.pixels],
                                       return_tensors="pt")["pixel_values"]
    names, captions, lengths = score_batch(model, pixels, text)
    # by hand: each (image, class) sequence in full, no cache
    hand_names, hand_captions = torch.zeros(3, 10), torch.zeros(3, 10)
    with torch.no_grad():
        for b in range(3):
            for c in range(10):
                ids = torch.tensor([text.context + text.names[c] + text.end])
                logp = model(input_ids=ids, pixel_values=pixels[b:b + 1]).logits.log_softmax(-1)[0]
                token_lp = logp[:-1].gather(-1, ids[0, 1:, None]).squeeze(-1)
                start = len(text.context)
                hand_names[b, c] = token_lp[start - 1:start - 1 + len(text.names[c])].sum()
                hand_captions[b, c] = token_lp[text.caption_start - 1:].sum()
                assert lengths[c] == ids.shape[1] - text.caption_start
    torch.testing.assert_close(names, hand_names, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(captions, hand_captions, rtol=1e-4, atol=1e-4)
    result = evaluate(model, processor, images, recipe=TINY, progress=False)
    assert isinstance(result, VLMAccuracy) and result.images == 3 and 0 <= result.accuracy <= 1
    assert result.accuracy == pytest.approx(float((hand_names.argmax(-1) == images.labels).float().mean()))
    nll = -sum(float(hand_captions[b, images.labels[b]]) for b in range(3))
    tokens = sum(int(lengths[images.labels[b]]) for b in range(3))
    assert result.caption_ppl == pytest.approx(torch.tensor(nll / tokens).exp().item(), rel=1e-4)
    assert evaluate(model, processor, images, recipe=TINY, limit=2, progress=False).images == 2


def test_the_training_pairs_and_held_out_images_are_disjoint_random_draws():
    pairs, held = split(50_000)
    assert len(pairs) == RECIPE.pairs and len(held) == RECIPE.holdout
    assert not set(pairs.tolist()) & set(held.tolist())
    assert len(set((held // 5000).tolist())) == 10  # every class (the split lists them in order)


def test_eval_refuses_a_bad_task_in_one_line(built, tiny_llama_dir, capsys):
    folder, *_ = built
    for args, message in [([str(tiny_llama_dir), "--task", "cifar10-vlm"], "not a vision-language model"),
                          ([str(folder), "--task", "cifar10"], "give --task cifar10-vlm"),
                          ([str(folder), "--task", "nonsense"], "give --task cifar10-vlm")]:
        assert main(["eval", *args, "--quiet"]) == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("permsparse: error:")]
        assert len(errors) == 1 and message in errors[0], errors


def test_the_cached_folder_is_reused_and_built_again_for_another_recipe(tmp_path, monkeypatch, tiny_tokenizer):
    import json
    from dataclasses import asdict

    import permsparse.models.loading
    import permsparse.models.vit_testbed
    import permsparse.models.vlm_testbed as vlm

    vit_folder = tmp_path / "cifar10-vit"
    tiny_vit().save_pretrained(vit_folder)
    vit_processor().save_pretrained(vit_folder)
    monkeypatch.setattr(permsparse.models.vit_testbed, "testbed_folder", lambda cache, progress=True: vit_folder)
    monkeypatch.setattr(permsparse.models.loading, "load_model", lambda spec: (tiny_llama(), tiny_tokenizer))
    monkeypatch.setattr(vlm, "load_images", lambda source: tiny_images(4, 0))
    calls = []

    def fake_build(folder, *args, notes=None, **kwargs):
        calls.append(notes)
        folder.mkdir(exist_ok=True)
        (folder / "config.json").write_text("{}")
        (folder / vlm.RECORD).write_text(json.dumps({"recipe": asdict(vlm.RECIPE), **notes}))

    monkeypatch.setattr(vlm, "build", fake_build)
    folder = vlm.vlm_folder(tmp_path, progress=False)
    assert folder == tmp_path / "cifar10-vlm" and len(calls) == 1
    assert calls[0]["vit_recipe"] == asdict(permsparse.models.vit_testbed.RECIPE)
    assert vlm.vlm_folder(tmp_path, progress=False) == folder and len(calls) == 1  # cached
    for key, value in [("recipe", {"lr": 1.0}), ("vit_recipe", {"epochs": 1})]:
        record = json.loads((folder / vlm.RECORD).read_text())
        (folder / vlm.RECORD).write_text(json.dumps({**record, key: value}))
        vlm.vlm_folder(tmp_path, progress=False)
    assert len(calls) == 3
