"""Distillation on new inputs (``compress(..., distill_inputs=...)``, ``lrc compress --calib FOLDER``)
and the random views of an image folder that feed it (``views.ViewStream``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lowrank_compress import CompressConfig, compress
from lowrank_compress.views import ViewStream
from lowrank_compress.errors import UsageError


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU())
        self.head = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _kl(reference: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        p = reference(x).log_softmax(-1)
        q = model(x).log_softmax(-1)
    return float((p.exp() * (p - q)).sum(-1).mean())


class Fresh:
    """New Gaussian batches on every draw; counts them."""

    def __init__(self, seed: int) -> None:
        self.gen, self.drawn = torch.Generator().manual_seed(seed), 0

    def __iter__(self):
        while True:
            self.drawn += 1
            yield torch.randn(16, 24, generator=self.gen)


def test_distilling_on_new_inputs_generalizes_where_a_few_calibration_inputs_overfit():
    # 32 calibration inputs for a 24-dimensional input: the fits and the distillation on them alone
    # learn those 32; new inputs each step teach the map itself.
    torch.manual_seed(0)
    model = Classifier().eval()
    with torch.no_grad():
        model.head.weight.mul_(4.0)  # confident logits: a small error moves the softmax
    gen = torch.Generator().manual_seed(1)
    calibration = list(torch.randn(32, 24, generator=gen).split(8))
    evaluation = torch.randn(2048, 24, generator=gen)
    config = CompressConfig(rank=4, refine_steps=20, block_steps=0, distill_steps=300, distill_lr=0.03, seed=0)
    kl = {}
    for name in ("calibration", "fresh"):
        stream = Fresh(7) if name == "fresh" else None
        compressed, report = compress(copy.deepcopy(model), config, calibration[0][:1], calibration=calibration,
                                      distill_inputs=stream)
        kl[name] = _kl(model, compressed, evaluation)
        if stream is not None:
            assert report.distillation["inputs"] == "new inputs from distill_inputs"
            # as many held-out batches as the calibration held out (32 samples in batches of 4, every
            # fourth held out: 2), then one per step run
            assert stream.drawn == 2 + report.distillation["steps"] and report.distillation["steps"] > 25
            assert report.distillation["batch_size"] == 16 and report.distillation["lr"] == 0.03
        else:
            assert report.distillation["inputs"] == "calibration inputs"  # vectors: nothing to flip
    assert kl["fresh"] < 0.7 * kl["calibration"], kl


def test_distill_inputs_need_calibration_and_must_yield_batches():
    model = Classifier().eval()
    x = torch.randn(32, 24)
    with pytest.raises(UsageError, match="pass calibration too"):
        compress(copy.deepcopy(model), CompressConfig(rank=4), x[:1], distill_inputs=[x])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = CompressConfig(rank=4, refine_steps=5, block_steps=0, distill_steps=10)
    with pytest.raises(UsageError, match="yielded no batch"):
        compress(model, config, x[:1], calibration=list(x.split(8)), distill_inputs=[])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched after the failure


def test_a_one_shot_iterator_ends_the_distillation_when_it_runs_out():
    torch.manual_seed(0)
    model = Classifier().eval()
    gen = torch.Generator().manual_seed(1)
    calibration = list(torch.randn(32, 24, generator=gen).split(8))  # 2 held-out batches of 4
    config = CompressConfig(rank=4, refine_steps=5, block_steps=0, distill_steps=100, seed=0)
    batches = (torch.randn(16, 24, generator=gen) for _ in range(12))
    _, report = compress(copy.deepcopy(model), config, calibration[0][:1], calibration=calibration,
                         distill_inputs=batches)
    assert report.distillation["steps"] == 10  # 12 batches: 2 held out, 10 trained on
    short = (torch.randn(16, 24, generator=gen) for _ in range(1))
    with pytest.raises(UsageError, match="yielded 1 batches; its held-out check alone takes 2"):
        compress(copy.deepcopy(model), config, calibration[0][:1], calibration=calibration, distill_inputs=short)


def test_distill_lr_must_be_a_positive_number():
    for bad in (0, -0.1, float("inf"), float("nan"), True, "0.1", "Auto"):
        with pytest.raises(UsageError, match="--distill-lr"):
            CompressConfig(rank=4, distill_lr=bad)
    assert CompressConfig(rank=4, distill_lr="auto").distill_lr == "auto"


def test_lrc_compress_rejects_a_step_size_that_is_neither_a_number_nor_auto(tmp_path, run_cli):
    from lowrank_compress.examples.digits import bundled_checkpoint_path

    result = run_cli("compress", bundled_checkpoint_path(), "--rank", "4", "--calib", "gaussian",
                     "--distill-lr", "fast", "-o", tmp_path / "c.lrc.safetensors")
    assert result.code == 2 and "--distill-lr must be a positive number or 'auto', got 'fast'" in result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "c.lrc.safetensors").exists()


def _photos(folder: Path, count: int, size: tuple[int, int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        # smooth colour gradients plus noise, a different one per image
        yy, xx = np.mgrid[0:size[1], 0:size[0]]
        base = np.stack([(xx * (i + 1) + yy) % 256, (yy * (i + 2)) % 256, (xx + 3 * yy * i) % 256], -1)
        noise = rng.integers(0, 40, base.shape)
        Image.fromarray(((base + noise) % 256).astype(np.uint8)).save(folder / f"{i}.png")


def test_a_view_stream_draws_new_views_of_the_folder_reproducibly(tmp_path):
    _photos(tmp_path / "photos", 3, (300, 200))
    shape, config = (1, 3, 32, 32), {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    state = torch.random.get_rng_state()
    stream = ViewStream(tmp_path / "photos", shape, config, samples=8, batch_size=4, seed=3, min_scale=0.25)
    first = [b for _, b in zip(range(3), stream)]
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
    assert all(b.shape == (4, 3, 32, 32) and b.dtype == torch.float32 for b in first)
    assert all(-1.0 <= float(b.min()) and float(b.max()) <= 1.0 for b in first)  # normalized by mean/std 0.5
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    # iterating again continues; batch k depends on (seed, k) alone
    again = ViewStream(tmp_path / "photos", shape, config, 8, 4, seed=3, min_scale=0.25)
    assert torch.equal(next(iter(stream)), again.batch(3))
    other = ViewStream(tmp_path / "photos", shape, config, 8, 4, seed=4, min_scale=0.25)
    assert not torch.equal(first[0], other.batch(0))
    # a decoded image is kept downscaled: a view of a quarter of its area still has 32 pixels a side
    assert stream._cache and all(min(image.size) == 64 for image in stream._cache.values())
    assert "3 images" in stream.description
    half = ViewStream(tmp_path / "photos", shape, config, 8, 4, seed=3, min_scale=0.25, dtype=torch.bfloat16)
    assert half.batch(0).dtype == torch.bfloat16 and torch.allclose(half.batch(0).float(), first[0], atol=1e-2)
    # the smallest view sets how far an image may be downscaled: a tenth of the area needs 102 pixels,
    # the default (ImageNet training's 0.08) 114
    for scale, side in ((0.1, 102), (None, 114)):
        wide = ViewStream(tmp_path / "photos", shape, config, 8, 4, seed=3, **({"min_scale": scale} if scale else {}))
        wide.batch(0)
        assert wide._cache and all(min(image.size) == side for image in wide._cache.values())
    for bad in (0.0, 1.5):
        with pytest.raises(UsageError, match="smallest view"):
            ViewStream(tmp_path / "photos", shape, config, 8, 4, min_scale=bad)


@pytest.mark.parametrize("samples", [64, 24])
def test_lrc_compress_distills_on_views_of_a_calibration_folder_of_fewer_images(tmp_path, run_cli, samples):
    # 24 images: with --calib-samples 64 they were filled up with views, and distillation draws new
    # views; with 24 they are the calibration set, and distillation trains on them.
    from lowrank_compress.examples.digits import bundled_checkpoint_path, load_digits_split, write_image_folder

    x, y = load_digits_split()[:2]
    folder = write_image_folder(tmp_path, x[:24], y[:24], "calib")
    result = run_cli("compress", bundled_checkpoint_path(), "--rank", "4", "--refine-steps", "5", "--block-steps", "0",
                     "--calib", folder, "--calib-samples", str(samples), "--distill-steps", "30",
                     "--distill-lr", "0.05",
                     "-o", tmp_path / "c.lrc.safetensors", "--json", tmp_path / "r.json", "--quiet")
    assert result.code == 0, result.err
    distilled = json.loads((tmp_path / "r.json").read_text())["distillation"]
    views = f"new random views of the 24 images in {folder}"
    assert distilled["inputs"] == (views if samples == 64 else "calibration inputs, flipped and mixed up")
    assert distilled["schedule"] == "requested" and 0 < distilled["steps"] <= 30
    assert distilled["lr"] == 0.05 and distilled["batch_size"] == (8 if samples == 64 else 3)
    assert distilled["after"] <= distilled["before"]
