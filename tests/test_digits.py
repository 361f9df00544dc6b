"""The embedded default: the digits CNN, its data split, image folders and the shipped files."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lowrank_compress.examples import digits



@pytest.fixture(scope="module")
def one_epoch() -> tuple[digits.DigitsCNN, float]:
    return digits.train_digits_cnn(seed=0, epochs=1)


def test_model_maps_a_batch_of_digits_to_ten_logits() -> None:
    model = digits.DigitsCNN().eval()
    assert model(torch.zeros(3, *digits.INPUT_SHAPE[1:])).shape == (3, 10)
    assert sum(p.numel() for p in model.parameters()) < 500_000


def test_arch_spec_names_the_model_class() -> None:
    module_name, _, attr = digits.ARCH_SPEC.partition(":")
    assert getattr(importlib.import_module(module_name), attr) is digits.DigitsCNN


def test_bundled_checkpoint_loads_strictly_and_reaches_its_stated_accuracy() -> None:
    model, x_test, y_test = digits.load_bundled()  # load_state_dict(strict=True) inside
    meta = digits.bundled_metadata()
    stated = float(meta["test_accuracy"])
    assert digits.accuracy(model, x_test, y_test) == pytest.approx(stated, abs=1e-6)
    assert stated >= 0.97


def test_bundled_checkpoint_metadata_describes_how_to_rebuild_and_feed_it() -> None:
    meta = digits.bundled_metadata()
    assert meta["arch"] == digits.ARCH_SPEC
    assert json.loads(meta["arch_kwargs"]) == {}
    assert json.loads(meta["input_shape"]) == [1, 1, 32, 32]
    assert (tuple(json.loads(meta["mean"])), tuple(json.loads(meta["std"]))) == digits.normalization()
    assert digits.bundled_checkpoint_path().stat().st_size < 2_000_000


def test_bundled_test_split_is_the_held_out_split_of_the_stated_seed() -> None:
    _, x_bundled, y_bundled = digits.load_bundled()
    _, _, x_test, y_test = digits.load_digits_split(seed=int(digits.bundled_metadata()["seed"]))
    assert torch.equal(x_bundled, x_test) and torch.equal(y_bundled, y_test)


def test_split_is_deterministic_for_a_seed_and_differs_between_seeds() -> None:
    first, again, other = digits.load_digits_split(0), digits.load_digits_split(0), digits.load_digits_split(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[3], other[3])


def test_split_is_a_stratified_70_30_split_of_normalized_32x32_images() -> None:
    x_train, y_train, x_test, y_test = digits.load_digits_split(seed=0)
    assert x_train.shape == (1257, 1, 32, 32) and x_test.shape == (540, 1, 32, 32)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    test_share = torch.bincount(y_test, minlength=10) / torch.bincount(torch.cat([y_train, y_test]), minlength=10)
    assert torch.allclose(test_share, torch.full((10,), 0.3), atol=0.01)
    pixels = torch.cat([x_train, x_test]) * digits.DIGITS_STD + digits.DIGITS_MEAN
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert pixels.mean().item() == pytest.approx(digits.DIGITS_MEAN, abs=1e-3)


def test_split_resizes_to_the_requested_size() -> None:
    x_train, _, x_test, _ = digits.load_digits_split(seed=0, size=16)
    assert x_train.shape[1:] == x_test.shape[1:] == (1, 16, 16)


def test_image_folder_holds_one_grayscale_png_per_sample_in_its_class_folder(tmp_path: Path) -> None:
    _, _, x_test, y_test = digits.load_digits_split(seed=0)
    x, y = x_test[:40], y_test[:40]
    split_dir = digits.write_image_folder(tmp_path, x, y, "val")
    assert split_dir == tmp_path / "val"
    assert sorted(p.name for p in split_dir.iterdir()) == [str(c) for c in range(10)]
    for label in range(10):
        assert len(list((split_dir / str(label)).glob("*.png"))) == int((y == label).sum())
    image = Image.open(split_dir / str(int(y[7])) / "7.png")
    assert image.mode == "L" and image.size == (32, 32)
    restored = (torch.from_numpy(np.asarray(image, dtype=np.float32)) / 255 - digits.DIGITS_MEAN) / digits.DIGITS_STD
    assert torch.allclose(restored, x[7, 0], atol=0.51 / 255 / digits.DIGITS_STD)


def test_one_epoch_of_training_is_far_better_than_chance(one_epoch: tuple[digits.DigitsCNN, float]) -> None:
    _, test_accuracy = one_epoch
    assert test_accuracy > 0.5


def test_training_with_the_same_seed_gives_the_same_weights(one_epoch: tuple[digits.DigitsCNN, float]) -> None:
    model, test_accuracy = one_epoch
    again, again_accuracy = digits.train_digits_cnn(seed=0, epochs=1)
    assert again_accuracy == test_accuracy
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_deterministic_block_restores_the_global_determinism_and_thread_settings() -> None:
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1
    with digits.deterministic(threads=2):
        assert torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 2
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == 1


def test_batchnorm_recalibration_sets_running_stats_to_the_data_average() -> None:
    bn = torch.nn.BatchNorm2d(3)
    x = torch.randn(64, 3, 4, 4) * 2 + 5
    digits.recalibrate_batchnorm(torch.nn.Sequential(bn), x, batch_size=16)
    assert torch.allclose(bn.running_mean, x.mean(dim=(0, 2, 3)), atol=1e-5)
    assert bn.momentum == 0.1 and not bn.training


def test_a_file_naming_the_models_old_module_still_loads(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from lowrank_compress.io.opening import open_model

    model = digits.DigitsCNN().eval()
    path = tmp_path / "old.safetensors"
    save_file(model.state_dict(), str(path), metadata={"arch": "lowrank_compress.digits:DigitsCNN",
                                                       "input_shape": json.dumps(list(digits.INPUT_SHAPE))})
    loaded = open_model(path, None, {}, False, None)
    assert isinstance(loaded.model, digits.DigitsCNN)
    x = torch.randn(digits.INPUT_SHAPE)
    assert torch.equal(loaded.model.eval()(x), model(x))


def test_the_bundled_checkpoint_names_the_models_module() -> None:
    assert digits.bundled_metadata()["arch"] == digits.ARCH_SPEC == "lowrank_compress.examples.digits:DigitsCNN"
