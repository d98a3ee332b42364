"""Vision Transformers: discovery on images, every permutation, the learned one on labelled images,
exact exports and folds, image calibration, the command line and the testbed alias."""
import dataclasses
import json

import pytest
import torch

from permsparse import prune
from permsparse.discover.adapters import adapter_for
from permsparse.checkpoint.check import check_checkpoint
from permsparse.checkpoint.record import read_record
from permsparse.checkpoint.save import ExportConfig, export_checkpoint
from permsparse.config import Learned, PruneConfig, Search
from permsparse.discover import probe_input
from permsparse.data.images import Accuracy, draw_calibration, evaluation_images

from .conftest import LABELS, PIXELS, PIXELS_HOLDOUT, PIXELS_INPUT, export_both_ways, reload, tiny_vit

pytest.importorskip("PIL")

GROUPS = (("attention.q_proj", "attention.k_proj", "attention.v_proj"), ("attention.o_proj",), ("mlp.fc1",),
          ("mlp.fc2",))
FOLDS = {"attention.o_proj": ["attention.v_proj"], "mlp.fc2": ["mlp.fc1"]}
STREAM = ("vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
          "vit.embeddings.patch_embeddings.projection.weight", "vit.embeddings.patch_embeddings.projection.bias")
CONFIGS = {
    "none": PruneConfig(),
    "cp": PruneConfig(permutation=Search("cp"), binding="shared"),
    "ria": PruneConfig(permutation=Search("ria"), binding="global"),
    "output": PruneConfig(permutation=Search("output")),
}


def logits(model, pixels=PIXELS_INPUT):
    with torch.no_grad():
        return model(pixel_values=pixels).logits


def write_images(root, classes=("cats", "dogs"), per_class=10):
    """A class-per-folder tree of seeded random 32x32 PNGs."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (32, 32, 3), generator=generator, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_discovery_feeds_random_images_and_finds_four_sites_per_block():
    model = tiny_vit()
    assert probe_input(model).shape == (1, 3, 32, 32)
    adapter = adapter_for(model)
    assert adapter.blocks_path == "vit.layers" and adapter.input_groups == GROUPS
    assert {c: [s.describe() for s in slices] for c, slices in adapter.producers} == FOLDS
    assert adapter.attn_output == "attention.o_proj" and not adapter.not_foldable
    assert set(adapter.residual_readers) == {"attention.q_proj", "attention.k_proj", "attention.v_proj", "mlp.fc1"}
    # the whole stream: patch embedding, class token and positions in, the final norm and classifier out
    assert adapter.stream_parameters == STREAM and adapter.block_norms == ("layernorm_before", "layernorm_after")
    assert adapter.final_norms == ("vit.layernorm",) and adapter.output_readers == ("classifier",)
    assert adapter.stream_problem == ""


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_every_search_prunes_exports_and_folds_exactly(method, tmp_path):
    model, config = tiny_vit(), CONFIGS[method]
    report = prune(model, None, config, windows=PIXELS, progress=False)
    assert len(report.layers) == 2 * 6
    fold = export_both_ways(model, config, report, tmp_path, logits)
    if method in ("cp", "ria"):
        consumers = {f"vit.layers.{i}.{c}" for i in range(2) for c in FOLDS}
        assert consumers <= set(fold.folded) | set(fold.identity)
    if config.binding == "global":  # one permutation of the whole stream: every linear N:M in storage
        assert fold.storage_nm_share == 1.0 and not fold.not_folded and fold.hidden_perm_applied


def test_deit_and_its_distillation_token_fold_the_whole_stream(tmp_path):
    from transformers import DeiTConfig, DeiTForImageClassificationWithTeacher

    torch.manual_seed(0)
    model = DeiTForImageClassificationWithTeacher(DeiTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=10)).eval()
    adapter = adapter_for(model)
    assert adapter.input_groups == GROUPS and "deit.embeddings.distillation_token" in adapter.stream_parameters
    assert adapter.output_readers == ("cls_classifier", "distillation_classifier") and adapter.stream_problem == ""
    config = CONFIGS["ria"]
    report = prune(model, None, config, windows=PIXELS, progress=False)
    folded = export_checkpoint(model, None, tmp_path / "folded", config, report, export=ExportConfig("folded"))
    assert read_record(folded).fold.storage_nm_share == 1.0 and check_checkpoint(folded).ok
    torch.testing.assert_close(logits(reload(folded)), logits(model), atol=1e-5, rtol=1e-4)


def test_learned_permutation_trains_on_labels_and_distils_the_dense_model():
    for scope, learned in (("e2e", Learned(init="ria", steps=3, judge_every=1, tile=16, kl=0.5)),
                           ("blockwise", Learned(init="ria", steps=2, judge_every=1, tile=16, scope="blockwise"))):
        model = tiny_vit()
        report = prune(model, None, PruneConfig(permutation=learned, binding="shared"), windows=PIXELS,
                       holdout=PIXELS_HOLDOUT, labels=LABELS, progress=False)
        assert report.training and all(r.best_judged <= r.init_judged for r in report.training), scope
        assert len(report.training) == (1 if scope == "e2e" else 2)
    with pytest.raises(ValueError, match="cross-entropy needs the labels"):
        prune(tiny_vit(), None, PruneConfig(permutation=Learned(init="ria", steps=1, tile=16, ce=1.0)), windows=PIXELS,
              holdout=PIXELS_HOLDOUT, progress=False)


def test_image_calibration_is_seeded_disjoint_and_spares_the_evaluation_images(tmp_path):
    from permsparse.models.vit_testbed import processor

    source = f"imagefolder:{write_images(tmp_path / 'images')}"
    (pixels, held), (labels, held_labels) = draw_calibration(processor(), source, 6, seed=0, holdout=4)
    assert pixels.shape == (6, 3, 32, 32) and held.shape == (4, 3, 32, 32)
    assert len(labels) == 6 and len(held_labels) == 4
    again = draw_calibration(processor(), source, 6, seed=0, holdout=4)
    assert torch.equal(again[0][0], pixels) and torch.equal(again[1][1], held_labels)
    assert not (pixels[:, None] == held[None]).flatten(2).all(-1).any()  # no held-out image is a training one
    evaluated, exclude = evaluation_images(source, 6, 4, seed=0)
    assert evaluated == source and len(exclude) == 10 and len(set(exclude.tolist())) == 10
    assert evaluation_images("cifar10", 6, 4, seed=0) == ("cifar10-test", None)
    with pytest.raises(ValueError, match="'cifar10-test' is an evaluation split"):
        draw_calibration(processor(), "cifar10-test", 4, seed=0)
    with pytest.raises(ValueError, match="calibrates on images"):
        prune(tiny_vit(), processor(), PruneConfig(), progress=False)


def test_image_loading_names_the_folder_or_file_that_is_wrong(tmp_path):
    from permsparse.data.images import load_images

    (tmp_path / "empty" / "cats").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"image folder .*empty holds no images"):
        load_images(f"imagefolder:{tmp_path / 'empty'}")
    root = write_images(tmp_path / "images", per_class=2)
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"dogs/broken\.png is not a readable image"):
        load_images(f"imagefolder:{root}")


@pytest.fixture()
def tiny_vit_dir(tmp_path):
    """The tiny ViT saved as a Hugging Face folder with an image processor config."""
    from permsparse.models.vit_testbed import processor

    folder = tmp_path / "tiny-vit"
    tiny_vit().save_pretrained(folder)
    processor().save_pretrained(folder)
    return folder


def test_cli_prunes_a_vit_folder_and_records_top1(tiny_vit_dir, tmp_path, capsys):
    from permsparse.cli import main

    images = write_images(tmp_path / "images")
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(tiny_vit_dir), "--calib", f"imagefolder:{images}", "--nsamples", "8",
                 "--perm", "ria", "--binding", "global", "--export", "folded", "--out", str(out), "--quiet"]) == 0
    record = read_record(out)
    metric = record.metrics[f"imagefolder:{images}"]
    assert isinstance(metric, Accuracy) and metric.images == 20 - 8 and 0 <= metric.top1 <= metric.top5 <= 1
    assert record.fold.storage_nm_share == 1.0 and check_checkpoint(out).ok
    assert "kept dense: vit.embeddings.patch_embeddings, classifier" in (out / "log.txt").read_text()
    assert (out / "preprocessor_config.json").is_file()
    result = tmp_path / "eval.json"
    assert main(["eval", str(out), "--task", f"imagefolder:{images}", "--json", str(result), "--quiet"]) == 0
    assert json.loads(result.read_text())["accuracy"]["images"] == 20
    assert main(["eval", str(tiny_vit_dir), "--task", "cifar10", "--limit", "16", "--quiet"]) == 0
    assert "on 16 images of cifar10-test" in capsys.readouterr().out
    assert main(["eval", str(tiny_vit_dir), "--quiet"]) == 2
    assert "give --task cifar10 or imagefolder:PATH" in capsys.readouterr().err


def test_testbed_alias_loads_the_cached_folder(tiny_vit_dir, tmp_path, monkeypatch):
    import shutil

    from permsparse.models.loading import load_model

    from permsparse.models.vit_testbed import RECIPE

    folder = tmp_path / "cache" / "cifar10-vit"
    shutil.copytree(tiny_vit_dir, folder)
    (folder / "testbed.json").write_text(json.dumps({"recipe": dataclasses.asdict(RECIPE)}))
    monkeypatch.setenv("PERMSPARSE_CACHE", str(tmp_path / "cache"))
    model, processor = load_model("cifar10-vit")
    assert type(model).__name__ == "ViTForImageClassification" and not model.training
    assert type(processor).__name__.startswith("ViTImageProcessor")


def test_testbed_recipe_trains_deterministically():
    from permsparse.models.vit_testbed import Recipe, fit, top1

    pixels = torch.randint(0, 256, (32, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    labels = torch.arange(32) % 10
    recipe = Recipe(hidden=32, layers=1, heads=2, mlp=64, epochs=2, batch=16, warmup_epochs=0.5)
    a, b = fit(recipe, pixels, labels, progress=False), fit(recipe, pixels, labels, progress=False)
    assert not a.training and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert 0 <= top1(a, pixels, labels) <= 1


def test_testbed_trained_by_another_recipe_is_trained_again(tiny_vit_dir, tmp_path, monkeypatch):
    import shutil

    from permsparse.models import vit_testbed as testbed

    folder = tmp_path / "cifar10-vit"
    shutil.copytree(tiny_vit_dir, folder)
    recorded = {"recipe": dataclasses.asdict(dataclasses.replace(testbed.RECIPE, lr=testbed.RECIPE.lr * 2))}
    (folder / "testbed.json").write_text(json.dumps(recorded))
    trained = []
    monkeypatch.setattr(testbed, "train", lambda where, progress=True: trained.append(where))
    assert testbed.testbed_folder(tmp_path, progress=False) == folder and trained == [folder]
    (folder / "testbed.json").write_text(json.dumps({"recipe": dataclasses.asdict(testbed.RECIPE)}))
    assert testbed.testbed_folder(tmp_path, progress=False) == folder and trained == [folder]  # reused as it is
