"""Vision-language models: each tower found from the model, pruned alone, exported and reloaded exactly.

Tiny random models of transformers' own classes (LLaVA, Qwen2-VL, Qwen2.5-VL, Idefics3, Gemma 3,
PaliGemma), built from their configs, judged on an image + text input: only the chosen tower's linears
change, every pruned linear is N:M, and the masked and folded exports reload to the pruned model's logits.
"""
import copy
import dataclasses
import json

import pytest
import torch

from permsparse import Learned, PruneConfig, Search, prune
from permsparse.config import Calibration
from permsparse.discover.adapters import adapter_for
from permsparse.discover import TowerError, find_towers, vision_tower
from permsparse.sparsity.masks import is_nm

from .conftest import CALIB, HOLDOUT, PIXELS, PIXELS_HOLDOUT, export_both_ways, tiny_llama

TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2)
IMAGE, START, END = 500, 502, 503  # special token ids of the tiny models
MROPE = {"type": "mrope", "mrope_section": [2, 3, 3]}


def _config(kind: str):
    from transformers import (Gemma3Config, Idefics3Config, LlavaConfig, PaliGemmaConfig, Qwen2_5_VLConfig,
                              Qwen2VLConfig)

    if kind == "llava":
        return LlavaConfig(vision_config={"model_type": "clip_vision_model", **VISION, "projection_dim": 32},
                           text_config={"model_type": "llama", **TEXT, "head_dim": 16}, image_token_id=IMAGE,
                           image_seq_length=16, vision_feature_layer=-1)
    if kind == "qwen2_vl":
        return Qwen2VLConfig(text_config={**TEXT, "rope_scaling": MROPE},
                             vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                                                patch_size=8, spatial_merge_size=2, temporal_patch_size=2),
                             image_token_id=IMAGE, video_token_id=501, vision_start_token_id=START,
                             vision_end_token_id=END)
    if kind == "qwen2_5_vl":
        return Qwen2_5_VLConfig(text_config={**TEXT, "rope_scaling": MROPE},
                                vision_config=dict(depth=2, hidden_size=32, out_hidden_size=64, num_heads=2,
                                                   intermediate_size=64, patch_size=8, spatial_merge_size=2,
                                                   temporal_patch_size=2, fullatt_block_indexes=[1], window_size=16),
                                image_token_id=IMAGE, video_token_id=501, vision_start_token_id=START,
                                vision_end_token_id=END)
    if kind == "idefics3":
        return Idefics3Config(text_config={"model_type": "llama", **TEXT, "head_dim": 16}, vision_config=VISION,
                              scale_factor=2, image_token_id=IMAGE)
    if kind == "gemma3":
        return Gemma3Config(text_config={**TEXT, "head_dim": 16}, vision_config=VISION, mm_tokens_per_image=4,
                            image_token_id=IMAGE, boi_token_id=START, eoi_token_id=END)
    if kind == "paligemma":
        return PaliGemmaConfig(text_config={"model_type": "gemma", **TEXT, "head_dim": 16},
                               vision_config={**VISION, "projection_dim": 64}, image_token_index=IMAGE,
                               projection_dim=64, hidden_size=64)
    raise KeyError(kind)


KINDS = ("llava", "qwen2_vl", "qwen2_5_vl", "idefics3", "gemma3", "paligemma")
# where each class keeps its towers, and whether its vision tower reads images (pixel values) directly
TOWERS = {"llava": ("model.language_model", "model.vision_tower", True),
          "qwen2_vl": ("model.language_model", "model.visual", False),
          "qwen2_5_vl": ("model.language_model", "model.visual", False),
          "idefics3": ("model.text_model", "model.vision_model", True),
          "gemma3": ("model.language_model", "model.vision_tower", True),
          "paligemma": ("model.language_model", "model.vision_tower", True)}


def tiny_vlm(kind: str, seed: int = 0):
    """A tiny random vision-language model of ``kind``; norm parameters, biases and the weights a class
    initialises to zero (Gemma 3's projector) are random, so a forgotten permutation of any of them shows."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(_config(kind)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():
                param.normal_(0, 0.1)
            elif param.dim() == 1:
                param.add_(0.1 * torch.randn_like(param))
    return model


def image_text(kind: str, seed: int = 2) -> dict:
    """One image and text around its image tokens, as each class's processor lays them out."""
    g = torch.Generator().manual_seed(seed)

    def text(n: int) -> torch.Tensor:
        return torch.randint(3, 400, (1, n), generator=g)

    if kind in ("qwen2_vl", "qwen2_5_vl"):  # 4x4 patches of 8 pixels, merged 2x2 into 4 image tokens
        ids = torch.cat([text(3), torch.tensor([[START] + [IMAGE] * 4 + [END]]), text(5)], 1)
        return {"input_ids": ids, "pixel_values": torch.randn(16, 3 * 2 * 8 * 8, generator=g),
                "image_grid_thw": torch.tensor([[1, 4, 4]]), "mm_token_type_ids": (ids == IMAGE).long()}
    tokens = {"llava": 16, "paligemma": 16, "gemma3": 4, "idefics3": 4}[kind]
    ids = torch.cat([text(3), torch.full((1, tokens), IMAGE), text(5)], 1)
    pixels = torch.randn(1, 3, 32, 32, generator=g)
    return {"input_ids": ids, "pixel_values": pixels[:, None] if kind == "idefics3" else pixels}


def logits_on(inputs: dict):
    def output(model):
        with torch.no_grad():
            return model(**inputs).logits
    return output


def linears(model, prefix: str) -> dict[str, torch.Tensor]:
    return {name: module.weight.detach().clone() for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.startswith(prefix)}


def assert_only_the_tower_pruned(model, report, untouched: dict[str, torch.Tensor]) -> None:
    """Every pruned linear is 2:4 through its permutation, and every ``untouched`` linear kept its weight."""
    perms = {name: torch.as_tensor(site.perm) for site in report.sites for name in site.linears}
    for layer in report.layers:
        weight = model.get_submodule(layer.name).weight
        assert is_nm(weight[:, perms.get(layer.name, torch.arange(weight.shape[1]))], 2, 4), layer.name
    for name, weight in linears(model, "").items():
        if name in untouched:
            assert torch.equal(weight, untouched[name]), f"{name} is outside the pruned tower but changed"


@pytest.mark.parametrize("kind", KINDS)
def test_towers_are_found_and_the_language_stack_is_discovered(kind):
    model = tiny_vlm(kind)
    language, vision, _ = TOWERS[kind]
    towers = find_towers(model)
    assert (towers.language, towers.vision) == (language, vision)
    adapter = adapter_for(model)
    assert adapter.blocks_path == f"{language}.layers"
    assert adapter.output_readers == ("lm_head",)
    assert vision in adapter.stream_problem  # the image path into the stream is not permuted
    assert find_towers(tiny_llama()) is None


@pytest.mark.parametrize("kind", KINDS)
def test_language_tower_prunes_and_exports_exactly_on_images_and_text(kind, tmp_path):
    model = tiny_vlm(kind)
    language, vision, _ = TOWERS[kind]
    inputs = image_text(kind)
    dense = logits_on(inputs)(model)
    untouched = {n: w for n, w in linears(model, "").items() if not n.startswith(language + ".")}
    config = PruneConfig(permutation=Search("ria"), binding="shared")
    report = prune(model, None, config, windows=CALIB, holdout=HOLDOUT, progress=False)
    assert report.layers and all(layer.name.startswith(f"{language}.layers.") for layer in report.layers)
    assert_only_the_tower_pruned(model, report, untouched)
    assert not torch.allclose(logits_on(inputs)(model), dense)
    fold = export_both_ways(model, config, report, tmp_path, logits_on(inputs))
    assert fold.folded  # o/down fold into v and gate/up within the language tower


@pytest.mark.parametrize("method", ["none", "cp", "output", "learned"])
def test_every_method_prunes_the_language_tower(method, tmp_path):
    model = tiny_vlm("llava")
    permutation = Learned(init="ria", steps=2, judge_every=1, tile=16, scope="blockwise") if method == "learned" else Search(method)
    config = PruneConfig(permutation=permutation)
    report = prune(model, None, config, windows=CALIB, holdout=HOLDOUT, progress=False)
    assert len(report.layers) == 14
    export_both_ways(model, config, report, tmp_path, logits_on(image_text("llava")))


@pytest.mark.parametrize("kind", KINDS)
def test_vision_tower_alone(kind):
    model = tiny_vlm(kind)
    _, vision, reads_images = TOWERS[kind]
    if not reads_images:
        with pytest.raises(TowerError, match=rf"^{vision} \(\w+\) reads \w+, not images"):
            vision_tower(model)
        return
    path, tower = vision_tower(model)
    assert path == vision
    assert len(adapter_for(tower).blocks(tower)) == 2


@pytest.mark.parametrize("kind", ["llava", "idefics3", "gemma3", "paligemma"])
def test_vision_tower_prunes_and_exports_exactly(kind, tmp_path):
    model = tiny_vlm(kind)
    _, vision, _ = TOWERS[kind]
    inputs = image_text(kind)
    untouched = {n: w for n, w in linears(model, "").items() if not n.startswith(vision + ".")}
    config = PruneConfig(permutation=Search("ria"), binding="shared", towers="vision")
    report = prune(model, None, config, windows=PIXELS, holdout=PIXELS_HOLDOUT, progress=False)
    assert report.layers and all(layer.name.startswith(vision + ".") for layer in report.layers)
    assert report.sites and {n for site in report.sites for n in site.linears} <= {layer.name for layer in report.layers}
    assert_only_the_tower_pruned(model, report, untouched)
    export_both_ways(model, config, report, tmp_path, logits_on(inputs))


def test_both_towers_and_clear_refusals(tmp_path):
    model = tiny_vlm("llava")
    config = PruneConfig(permutation=Search("ria"), towers="both")
    with pytest.raises(ValueError, match=r"^the vision tower calibrates on images .* --calib c4:1,cifar10:1$"):
        prune(model, None, config, windows=CALIB, holdout=HOLDOUT, progress=False)
    with pytest.raises(ValueError, match="has no vision tower"):
        prune(tiny_llama(), None, config, windows=CALIB, progress=False)
    with pytest.raises(ValueError, match="token ids, which the vision tower does not read"):
        prune(model, None, PruneConfig(towers="vision"), windows=CALIB, progress=False)
    vision_only = PruneConfig(permutation=Search("ria"), towers="vision", include=("model.language_model.*",))
    with pytest.raises(ValueError, match="names no linear of the vision tower"):
        prune(model, None, vision_only, windows=PIXELS, holdout=PIXELS_HOLDOUT, progress=False)
    # language on token ids, then vision on images of its own config (its first block only)
    language = prune(model, None, PruneConfig(permutation=Search("ria")), windows=CALIB, holdout=HOLDOUT,
                     progress=False)
    vision = prune(model, None, PruneConfig(permutation=Search("ria"), towers="vision",
                                            include=("model.vision_tower.*.layers.0.*",)),
                   windows=PIXELS, holdout=PIXELS_HOLDOUT, progress=False)
    assert {layer.name.split(".layers.")[0] for layer in language.layers + vision.layers} == {
        "model.language_model", "model.vision_tower.encoder"}
    assert all(".layers.0." in layer.name for layer in vision.layers)


def test_vision_tower_permutations_fold_into_the_tower(tmp_path):
    model = tiny_vlm("llava")
    config = PruneConfig(permutation=Search("ria"), binding="shared", towers="vision")
    report = prune(model, None, config, windows=PIXELS, holdout=PIXELS_HOLDOUT, progress=False)
    fold = export_both_ways(model, config, report, tmp_path, logits_on(image_text("llava")))
    # the MLP's second linear folds into the first, attention's output into v, within the vision tower
    assert {"model.vision_tower.encoder.layers.0.mlp.fc2",
            "model.vision_tower.encoder.layers.1.self_attn.out_proj"} <= set(fold.folded)


@pytest.fixture()
def llava_and_processor(tiny_tokenizer):
    """A tiny LLaVA whose processor (CLIP's image processor, the tiny tokenizer with an ``<image>`` token)
    builds its inputs: 16 image tokens per 32x32 image."""
    from transformers import AutoModelForImageTextToText, CLIPImageProcessor, LlavaConfig, LlavaProcessor

    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image = tokenizer.convert_tokens_to_ids("<image>")
    config = LlavaConfig(vision_config={"model_type": "clip_vision_model", **VISION, "projection_dim": 32},
                         text_config={"model_type": "llama", **{**TEXT, "vocab_size": 520, "bos_token_id": 0,
                                                                "eos_token_id": 1, "pad_token_id": 1}, "head_dim": 16},
                         image_token_id=image, image_seq_length=16, vision_feature_layer=-1)
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    processor = LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                  crop_size={"height": 32, "width": 32}),
                               tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
                               image_token="<image>", num_additional_image_tokens=1)
    return model, processor


@pytest.fixture()
def few_images(monkeypatch):
    """Eighty random 32x32 images of ten classes stand in for CIFAR-10's training split."""
    from permsparse.data import imagetext
    from permsparse.data.images import Images

    pixels = torch.randint(0, 256, (80, 3, 32, 32), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    images = Images(pixels, torch.arange(80) % 10, ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                    "horse", "ship", "truck"])
    monkeypatch.setattr(imagetext, "load_images", lambda source: images)
    return images


def test_image_text_windows_pack_whole_images_and_feed_them_to_the_model(llava_and_processor, few_images):
    from permsparse.sparsity.statistics import capture_block_inputs
    from permsparse.data.imagetext import draw_image_text, image_table, images_attached

    model, processor = llava_and_processor
    image = model.config.image_token_id
    train, held = draw_image_text(processor, "cifar10-captions", 3, 64, seed=0, holdout=2)
    assert train.ids.shape == (3, 64) and held.ids.shape == (2, 64)
    for part in (train, held):
        for ids, inputs in zip(part.ids, part.images):
            assert (ids == image).sum() == 16 * len(inputs["pixel_values"]) > 0  # whole images only
    seen = [tuple(p.flatten()[:8].tolist()) for part in (train, held) for w in part.images for p in w["pixel_values"]]
    assert len(seen) == len(set(seen))  # no image in two windows, held-out ones included
    for part in (train, held):  # the recorded indices name exactly the images in the windows, in order
        expected = torch.cat([w["pixel_values"] for w in part.images])
        named = processor.image_processor([few_images.pixels[i].permute(1, 2, 0).numpy() for i in part.index],
                                          return_tensors="pt")["pixel_values"]
        torch.testing.assert_close(named, expected)
    assert not set(train.index) & set(held.index)
    adapter = adapter_for(model)
    with images_attached(model, image_table(train, held)):
        captured, _ = capture_block_inputs(model, adapter, train.ids)
        with torch.no_grad():
            attached = model(input_ids=train.ids).logits
    with torch.no_grad():
        direct = torch.cat([model(input_ids=ids[None], **inputs).logits for ids, inputs in zip(train.ids, train.images)])
        bare = model(input_ids=train.ids.clamp_max(image - 1)).logits
    torch.testing.assert_close(attached, direct)
    assert not torch.allclose(attached, bare)
    decoder_inputs = []
    handle = model.get_submodule(adapter.blocks_path)[0].register_forward_pre_hook(
        lambda _m, args, kwargs: decoder_inputs.append(kwargs.get("hidden_states", args[0] if args else None)),
        with_kwargs=True)
    with torch.no_grad():
        for ids, inputs in zip(train.ids, train.images):
            model(input_ids=ids[None], **inputs)
    handle.remove()
    torch.testing.assert_close(captured, torch.cat(decoder_inputs))  # image features in the stream


def test_calibration_images_are_those_the_pruning_run_reads(llava_and_processor, few_images):
    from permsparse.data.calibration import calibration_images, text_windows

    model, processor = llava_and_processor
    config = PruneConfig(permutation=Learned(steps=1), calibration=Calibration(
        source="cifar10-captions:1,shakespeare:1", nsamples=4, seqlen=64, holdout=2))
    _, _, _, table = text_windows(model, processor, config, 2, show=False)
    read = torch.cat([inputs["pixel_values"] for inputs in table.values()])
    index = calibration_images(processor, config)
    named = processor.image_processor([few_images.pixels[i].permute(1, 2, 0).numpy() for i in index],
                                      return_tensors="pt")["pixel_values"]
    assert len(index) == len(read) > 0
    key = lambda p: tuple(p.flatten()[:16].tolist())  # noqa: E731
    assert sorted(map(key, named)) == sorted(map(key, read))


def test_language_tower_calibrates_on_images_and_text(llava_and_processor, few_images, tmp_path):
    model, processor = llava_and_processor
    twin = copy.deepcopy(model)
    config = PruneConfig(permutation=Learned(init="ria", steps=2, judge_every=1, tile=16, scope="blockwise"),
                         calibration=Calibration(source="cifar10-captions:1,shakespeare:1", nsamples=4, seqlen=64,
                                                 holdout=2))
    report = prune(model, processor, config, progress=False)
    assert len(report.layers) == 14
    text_only = dataclasses.replace(config, calibration=dataclasses.replace(config.calibration, source="shakespeare"))
    prune(twin, processor, text_only, progress=False)
    changed = [name for name, weight in linears(model, "model.language_model").items()
               if not torch.equal(weight, twin.get_submodule(name).weight)]
    assert changed  # the images changed what was pruned
    export_both_ways(model, config, report, tmp_path, logits_on(image_text("llava") | {"input_ids": torch.cat(
        [torch.randint(3, 400, (1, 3)), torch.full((1, 16), model.config.image_token_id), torch.randint(3, 400, (1, 5))], 1)}))


@pytest.mark.parametrize("kind", ["qwen2_vl", "gemma3"])
def test_windows_whose_images_move_positions_or_masks_are_refused(kind):
    from permsparse.sparsity.statistics import capture_block_inputs
    from permsparse.data.imagetext import ImageTextWindows, image_table, images_attached

    model = tiny_vlm(kind)
    inputs = image_text(kind)
    ids = inputs.pop("input_ids")
    if kind == "gemma3":  # its processor marks the image tokens, which attend to each other both ways
        inputs["token_type_ids"] = (ids == IMAGE).long()
    text = torch.randint(3, 400, ids.shape, generator=torch.Generator().manual_seed(9))
    windows = ImageTextWindows(torch.cat([ids, text]), [inputs, {}])
    with images_attached(model, image_table(windows)), pytest.raises(ValueError, match="calibrate its language tower on text"):
        capture_block_inputs(model, adapter_for(model), windows.ids)


def test_cli_prunes_both_towers_of_a_saved_vlm(llava_and_processor, few_images, monkeypatch, tmp_path):
    from permsparse.data import images as image_sources
    from permsparse.cli import main

    monkeypatch.setattr(image_sources, "load_images", lambda source: few_images)
    model, processor = llava_and_processor
    folder = tmp_path / "tiny-llava"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(folder), "--towers", "both", "--calib",
                 "shakespeare:1,cifar10-captions:1,cifar10:1", "--nsamples", "4", "--holdout", "2", "--seqlen", "64",
                 "--perm", "ria", "--eval-texts", "shakespeare", "--eval-windows", "1", "--export", "folded",
                 "--quiet", "--out", str(out)]) == 0
    assert main(["check", str(out)]) == 0
    record = json.loads((out / "permsparse.json").read_text())
    pruned = [layer["name"] for layer in record["report"]["layers"]]
    assert {name.split(".layers.")[0] for name in pruned} == {"model.language_model", "model.vision_tower.encoder"}
    inputs = image_text("llava") | {"input_ids": torch.cat([torch.randint(3, 400, (1, 3)), torch.full(
        (1, 16), model.config.image_token_id), torch.randint(3, 400, (1, 5))], 1)}
    from permsparse.checkpoint.load import load

    assert torch.isfinite(logits_on(inputs)(load(out))).all()
    assert main(["prune", "--model", str(folder), "--towers", "vision", "--out", str(tmp_path / "x")]) == 2


def test_image_text_follows_a_chat_template_of_text_turns(llava_and_processor):
    """A processor whose chat template reads text turns only (a language model's, as the testbed's) gets
    the image placeholder at the start of the user's text."""
    from permsparse.data.imagetext import pair_text

    _, processor = llava_and_processor
    assert pair_text(processor, "a photo of a cat.") == "<image>\nWhat is in this picture?\na photo of a cat."
    processor.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>" + "{{ m['content'] + '\\n' }}"
                               "{% endfor %}")
    assert pair_text(processor, "a photo of a cat.") == ("<|user|><image>\nWhat is in this picture?\n"
                                                         "<|assistant|>a photo of a cat.\n")


@pytest.mark.parametrize("layer,strategy", [(-2, "default"), ([-3, -1], "full")])
def test_vision_tower_objective_reads_what_the_projector_reads(layer, strategy):
    from transformers import AutoModelForImageTextToText

    from permsparse.per_tower import reading_projector_input

    config = _config("llava")
    config.vision_feature_layer, config.vision_feature_select_strategy = layer, strategy
    config.vision_config.num_hidden_layers = 3
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    path, tower = vision_tower(model)
    pixels = torch.randn(2, 3, 32, 32)
    seen = []
    handle = model.model.multi_modal_projector.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        model.model.get_image_features(pixel_values=pixels)
    handle.remove()
    with torch.no_grad(), reading_projector_input(model, tower):
        read = tower(pixels).last_hidden_state
    torch.testing.assert_close(read, seen[0])
    with torch.no_grad():  # only inside: the tower's own output is back after
        assert tower(pixels).last_hidden_state.shape != read.shape


def test_a_vlm_whose_processor_cannot_be_built_prunes_its_language_tower_on_text(tmp_path, capsys):
    """Qwen2-VL's processor needs torchvision (for its video processor), which this machine lacks: the model still
    prunes its language tower on text with its tokenizer, saying so in one line; image-text calibration and the
    vision tower then name what is missing, in one line each."""
    import importlib.util
    import sys
    from pathlib import Path

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: Qwen2-VL's processor builds here")
    from transformers import Qwen2VLImageProcessor

    from permsparse.cli import main

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import tiny_types

    folder, out = tmp_path / "tiny-qwen2-vl", tmp_path / "pruned"
    tiny_types.build("qwen2_vl").model.save_pretrained(folder)
    tiny_types.tokenizer().save_pretrained(folder)
    Qwen2VLImageProcessor().save_pretrained(folder)
    (folder / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2VLProcessor"}))
    common = ["--nsamples", "4", "--seqlen", "32", "--eval-windows", "0", "--perm", "ria", "--quiet"]
    capsys.readouterr()
    assert main(["prune", "--model", str(folder), "--calib", "shakespeare", "--export", "folded", *common,
                 "--out", str(out)]) == 0
    said = [line for line in (out / "log.txt").read_text().splitlines() if "processor cannot be built" in line]
    assert len(said) == 1 and "Qwen2VLVideoProcessor requires the Torchvision library" in said[0]
    assert main(["check", str(out)]) == 0
    record = json.loads((out / "permsparse.json").read_text())
    names = [layer["name"] for layer in record["report"]["layers"]]
    assert names and all(name.startswith("model.language_model.layers.") for name in names)
    for argv in (["--calib", "cifar10-captions:1,shakespeare:1"], ["--towers", "vision", "--calib", "cifar10"]):
        capsys.readouterr()
        assert main(["prune", "--model", str(folder), *argv, *common, "--out", str(tmp_path / "refused")]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("permsparse: error: ") and "needs the model's processor" in err
        assert "Qwen2VLVideoProcessor requires the Torchvision library" in err
        assert not (tmp_path / "refused").exists()
