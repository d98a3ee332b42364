"""Labelled images for vision Transformers: CIFAR-10, class folders with clear errors, accuracy."""
import pytest
import torch

from permsparse.data.images import accuracy, image_count, load_images, preprocess, sample

pytest.importorskip("PIL")


def write_png(path, seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (8, 8, 3), generator=g, dtype=torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_cifar10_test_split_has_ten_balanced_classes():
    images = load_images("cifar10-test")
    assert images.pixels.shape == (10000, 3, 32, 32) and images.pixels.dtype == torch.uint8
    assert images.classes[0] == "airplane" and len(images.classes) == 10
    assert torch.equal(torch.bincount(images.labels), torch.full((10,), 1000))


def test_image_folders_read_classes_and_name_what_is_wrong(tmp_path):
    for i in range(3):
        write_png(tmp_path / "cats" / f"{i}.png", i)
        write_png(tmp_path / "dogs" / f"{i}.png", 10 + i)
    images = load_images(f"imagefolder:{tmp_path}")
    assert images.classes == ["cats", "dogs"] and images.labels.tolist() == [0, 0, 0, 1, 1, 1]
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"dogs/broken\.jpg is not a readable image"):
        load_images(f"imagefolder:{tmp_path}")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        load_images(f"imagefolder:{tmp_path / 'empty'}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images(f"imagefolder:{tmp_path / 'nowhere'}")


def test_sampling_is_seeded_and_can_exclude():
    images = load_images("cifar10-test")
    assert image_count("cifar10-test") == len(images)
    a, b = sample(len(images), 50, seed=1), sample(len(images), 50, seed=1)
    assert torch.equal(a, b)
    rest = sample(len(images), 50, seed=2, exclude=a)
    assert not torch.isin(rest, a).any()


def test_accuracy_of_a_tiny_vit_and_its_processor():
    from transformers import ViTConfig, ViTForImageClassification

    from permsparse.models.vit_testbed import processor

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=64, num_labels=10)).eval()
    images = load_images("cifar10-test")
    pixels = preprocess(processor(), images, torch.arange(4))
    assert pixels.shape == (4, 3, 32, 32) and abs(float(pixels.mean())) < 1.0
    result = accuracy(model, processor(), "cifar10-test", limit=64, progress=False)
    assert result.images == 64 and 0 <= result.top1 <= result.top5 <= 1


def test_testbed_augmentation_keeps_shapes_and_is_seeded():
    from permsparse.models.vit_testbed import RECIPE, _augment

    pixels = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    a = _augment(pixels, torch.Generator().manual_seed(0), RECIPE.crop)
    b = _augment(pixels, torch.Generator().manual_seed(0), RECIPE.crop)
    assert a.shape == pixels.shape and torch.equal(a, b) and not torch.equal(a, pixels)
