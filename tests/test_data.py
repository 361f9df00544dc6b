"""Image folders, transforms, seeded augmentation and resumable sampling (lowrank_compress.data)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowrank_compress.io.records import DataConfig, LoadedModel
from lowrank_compress.data import (
    ImageFolder,
    SeededAugmentFolder,
    ShardSampler,
    TrainSampler,
    eval_transform,
    image_tensors,
    resolve_data_config,
    train_transform,
)
from lowrank_compress.errors import UsageError

GRAY = {"input_size": (1, 16, 16), "mean": (0.5,), "std": (0.25,), "interpolation": "bilinear", "crop_pct": 1.0}


def _write(path: Path, size: tuple[int, int] = (20, 20), mode: str = "L", value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value // 2, 0)).save(path)
    return path


def _folder(root: Path, classes: list[str], per_class: int = 3) -> Path:
    """Grayscale 20×20 horizontal ramps, brighter for later files: crops of them differ."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            (root / name).mkdir(parents=True, exist_ok=True)
            ramp = np.tile(np.arange(20, dtype=np.uint8) * 2, (20, 1)) + 15 * (c * per_class + i)
            Image.fromarray(ramp, mode="L").save(root / name / f"{i}.png")
    return root


def test_eval_transform_gives_the_input_size_and_normalizes() -> None:
    x = eval_transform(GRAY)(Image.new("L", (40, 30), 255))
    assert x.shape == (1, 16, 16)
    assert torch.allclose(x, torch.full_like(x, (1.0 - 0.5) / 0.25))


def test_eval_transform_crops_the_center_by_crop_pct() -> None:
    image = Image.new("L", (32, 32), 0)
    image.paste(255, (4, 4, 28, 28))  # a white square with a 4-pixel black border
    config = {**GRAY, "input_size": (1, 24, 24), "crop_pct": 0.75, "mean": (0.0,), "std": (1.0,)}
    x = eval_transform(config)(image)  # resize to 32 (= 24 / 0.75), keep the central 24×24
    assert x.shape == (1, 24, 24) and x.min() == 1.0


def test_train_transform_is_random_resized_crop_with_flip() -> None:
    config = {**GRAY, "input_size": (1, 12, 12)}
    transform = train_transform(config, min_crop_scale=0.2, hflip=0.5)
    outputs = {tuple(transform(Image.fromarray(np.arange(400, dtype=np.uint8).reshape(20, 20))).flatten().tolist()) for _ in range(8)}
    assert len(outputs) > 1
    assert all(len(o) == 144 for o in outputs)


def test_timm_archs_get_timm_training_transform() -> None:
    config = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bicubic", "crop_pct": 0.9}
    transform = train_transform(config, timm_arch=True)
    assert "RandomResizedCropAndInterpolation" in repr(transform)
    assert transform(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_resolve_data_config_prefers_the_recorded_input_shape() -> None:
    loaded = LoadedModel(model=torch.nn.Identity(), input_shape=(1, 3, 32, 32), data_config=DataConfig(input_size=(3, 224, 224), crop_pct=0.875))
    config = resolve_data_config(loaded)
    assert config["input_size"] == (3, 32, 32)
    assert config["crop_pct"] == 0.875 and config["mean"] == (0.485, 0.456, 0.406)
    assert resolve_data_config(loaded, (1, 3, 64, 48))["input_size"] == (3, 64, 48)


def test_resolve_data_config_falls_back_to_the_archs_config() -> None:
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    config = resolve_data_config(LoadedModel(model, "torchvision:resnet18", input_shape=(1, 3, 32, 32)))
    assert config["input_size"] == (3, 32, 32) and config["crop_pct"] == 224 / 256
    assert config["interpolation"] == "bilinear" and config["std"] == (0.229, 0.224, 0.225)


def test_resolve_data_config_without_a_size_asks_for_input_shape() -> None:
    with pytest.raises(UsageError, match="--input-shape"):
        resolve_data_config(LoadedModel(model=torch.nn.Identity()))


def test_image_folder_reads_grayscale_or_rgb(tmp_path: Path) -> None:
    _write(tmp_path / "cat" / "a.png", mode="RGB")
    assert ImageFolder(tmp_path, channels=1)[0][0].mode == "L"
    assert ImageFolder(tmp_path, channels=3)[0][0].mode == "RGB"


def test_numbered_class_folders_are_their_own_indices(tmp_path: Path) -> None:
    folder = ImageFolder(_folder(tmp_path, ["2", "10"]), channels=1)
    assert folder.class_to_idx == {"10": 10, "2": 2}
    assert {target for _, target in folder.samples} == {2, 10}
    assert folder.num_classes == 11


def test_named_class_folders_are_indexed_in_sorted_order(tmp_path: Path) -> None:
    folder = ImageFolder(_folder(tmp_path, ["zebra", "ant"]), channels=1)
    assert folder.class_to_idx == {"ant": 0, "zebra": 1}


def test_an_empty_folder_is_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "cls").mkdir()
    with pytest.raises(UsageError, match="no images"):
        ImageFolder(tmp_path, channels=1)


def test_image_tensors_stacks_a_flat_folder_at_the_input_shape(tmp_path: Path) -> None:
    for i in range(5):
        _write(tmp_path / f"{i}.png", size=(20 + i, 30))
    x = image_tensors(tmp_path, (1, 1, 16, 16), {"mean": (0.5,), "std": (0.25,)}, samples=3)
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x, torch.full_like(x, (128 / 255 - 0.5) / 0.25), atol=1e-6)


def test_image_tensors_spreads_samples_over_class_folders(tmp_path: Path) -> None:
    _folder(tmp_path, ["a", "b", "c"], per_class=4)
    x = image_tensors(tmp_path, (1, 3, 8, 8), {}, samples=3)
    assert x.shape == (3, 3, 8, 8)
    assert len({round(float(v), 4) for v in x[:, 0].mean(dim=(1, 2))}) == 3  # first, middle and last image


def test_a_folder_of_few_images_is_filled_up_with_seeded_random_views(tmp_path: Path) -> None:
    _folder(tmp_path, ["a"], per_class=3)
    config = {"mean": (0.5,), "std": (0.25,)}
    plain = image_tensors(tmp_path, (1, 1, 8, 8), config, samples=10)
    assert plain.shape == (3, 1, 8, 8)  # without views: the images there are
    torch.manual_seed(123)
    state = torch.get_rng_state()
    x = image_tensors(tmp_path, (1, 1, 8, 8), config, samples=10, seed=4, views=True)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    assert x.shape == (10, 1, 8, 8)
    assert torch.equal(x[:3], plain)  # every image once as it is, then views
    distinct = {tuple(v.flatten().tolist()) for v in x[3:]}
    assert len(distinct) == 7 and not distinct & {tuple(v.flatten().tolist()) for v in plain}
    assert torch.equal(image_tensors(tmp_path, (1, 1, 8, 8), config, samples=10, seed=4, views=True), x)
    assert not torch.equal(image_tensors(tmp_path, (1, 1, 8, 8), config, samples=10, seed=5, views=True), x)
    # Enough images: no views, the evenly spaced subset as before.
    assert torch.equal(image_tensors(tmp_path, (1, 1, 8, 8), config, samples=2, seed=4, views=True),
                       image_tensors(tmp_path, (1, 1, 8, 8), config, samples=2))


def test_calibration_from_a_small_folder_has_the_requested_samples_and_export_only_its_images(tmp_path: Path) -> None:
    from lowrank_compress.calibdata import calibration_batches

    _folder(tmp_path, ["a", "b"], per_class=2)
    batches = calibration_batches(str(tmp_path), (1, 1, 8, 8), {}, samples=9, batch_size=4, seed=1)
    assert [b.shape[0] for b in batches] == [4, 4, 1]
    only = calibration_batches(str(tmp_path), (1, 1, 8, 8), {}, samples=9, batch_size=4, seed=1, views=False)
    assert [b.shape[0] for b in only] == [4]


def test_an_unreadable_image_is_named(tmp_path: Path) -> None:
    _write(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UsageError, match="broken.png"):
        image_tensors(tmp_path, (1, 1, 8, 8), {}, samples=10)


def test_seeded_augmentation_depends_only_on_seed_epoch_and_index(tmp_path: Path) -> None:
    folder = ImageFolder(_folder(tmp_path, ["0", "1"]), channels=1)
    transform = train_transform({**GRAY, "input_size": (1, 8, 8)}, min_crop_scale=0.1)
    data = SeededAugmentFolder(folder, transform, seed=3)
    torch.manual_seed(0)
    random.seed(0)
    before = (torch.get_rng_state(), random.getstate())
    first = data[(1, 0)][0]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    torch.rand(10)  # a different global state changes nothing
    assert torch.equal(data[(1, 0)][0], first)
    assert not all(torch.equal(data[(1, epoch)][0], first) for epoch in range(1, 5))


def test_train_sampler_resumes_with_the_rest_of_the_same_order() -> None:
    data = list(range(20))
    full = TrainSampler(data, num_replicas=1, rank=0, seed=5)
    full.set_position(epoch=2)
    order = list(full)
    resumed = TrainSampler(data, num_replicas=1, rank=0, seed=5)
    resumed.set_position(epoch=2, skip=8)
    assert list(resumed) == order[8:] and len(resumed) == 12
    assert all(epoch == 2 for _, epoch in order)
    full.set_position(epoch=3)
    assert [i for i, _ in full] != [i for i, _ in order]


def test_train_sampler_shards_across_ranks() -> None:
    shards = []
    for rank in range(2):
        sampler = TrainSampler(list(range(10)), num_replicas=2, rank=rank, seed=0)
        sampler.set_position(0)
        shards.append({i for i, _ in sampler})
    assert shards[0] | shards[1] == set(range(10)) and not shards[0] & shards[1]


def test_shard_sampler_covers_every_index_once() -> None:
    indices = [i for rank in range(3) for i in ShardSampler(10, 3, rank)]
    assert sorted(indices) == list(range(10))
