"""Accuracy on image folders and the ``lrc eval`` command (lowrank_compress.evaluate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowrank_compress.examples import digits
from lowrank_compress.io import format as lrc_format
from lowrank_compress.io.records import DataConfig, LoadedModel
from lowrank_compress.evaluate import evaluate, evaluate_folder



@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``val/<digit>/<i>.png``: 150 held-out digits at 32×32."""
    root = tmp_path_factory.mktemp("digits")
    _, _, x_test, y_test = digits.load_digits_split(seed=0, size=32)
    digits.write_image_folder(root, x_test[:150], y_test[:150], "val")
    return root


@pytest.fixture(scope="module")
def compressed_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random DigitsCNN saved as .lrc.safetensors with input shape 1,1,16,16 and digits normalization."""
    torch.manual_seed(0)
    model = digits.DigitsCNN().eval()
    path = tmp_path_factory.mktemp("model") / "digits.lrc.safetensors"
    mean, std = digits.normalization()
    lrc_format.save(model, path, arch=digits.ARCH_SPEC, input_shape=[1, 1, 16, 16],
                       data_config={"mean": list(mean), "std": list(std)})
    return path


class _Fixed(nn.Module):
    """Returns the logits stored for each input index: x (B, 1) holds the index."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x[:, 0].long()]


def _loader(n: int, labels: list[int]) -> DataLoader:
    return DataLoader(TensorDataset(torch.arange(n).float()[:, None], torch.tensor(labels)), batch_size=3)


def test_top1_and_top5_are_fractions_of_the_samples() -> None:
    logits = torch.tensor([list(range(10))] * 4, dtype=torch.float32)  # class 9 ranks first, then 8, …
    result = evaluate(_Fixed(logits), _loader(4, [9, 7, 5, 0]), torch.device("cpu"))
    assert result == {"top1": 0.25, "top5": 0.75, "samples": 4}


def test_top5_with_fewer_than_five_classes_counts_every_prediction() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0]] * 2)
    result = evaluate(_Fixed(logits), _loader(2, [0, 2]), torch.device("cpu"))
    assert result["top1"] == 0.5 and result["top5"] == 1.0


def test_evaluation_uses_the_recorded_input_size(digits_dir: Path, compressed_file: Path) -> None:
    loaded = lrc_format.load_compressed(compressed_file)
    seen: list[tuple[int, ...]] = []
    loaded.model.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape[1:])))
    result = evaluate_folder(loaded, digits_dir, batch_size=64, workers=0)
    assert set(seen) == {(1, 16, 16)} and result["input_size"] == [1, 16, 16]
    assert result["samples"] == 150 and 0.0 <= result["top1"] <= result["top5"] <= 1.0


def test_eval_matches_the_in_memory_accuracy(digits_dir: Path) -> None:
    torch.manual_seed(1)
    model = digits.DigitsCNN().eval()
    mean, std = digits.normalization()
    loaded = LoadedModel(model, digits.ARCH_SPEC, input_shape=(1, 1, 32, 32), data_config=DataConfig(mean=mean, std=std))
    _, _, x_test, y_test = digits.load_digits_split(seed=0, size=32)
    expected = digits.accuracy(model, x_test[:150], y_test[:150])
    result = evaluate_folder(loaded, digits_dir, batch_size=64, workers=0)
    # The PNGs are uint8-rounded, so a handful of borderline predictions may differ.
    assert abs(result["top1"] - expected) <= 0.02


def test_eval_cli_writes_fractions_to_json(digits_dir: Path, compressed_file: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "eval.json"
    assert run_cli("eval", compressed_file, "--data", digits_dir, "--workers", "0", "--json", out).code == 0
    result = json.loads(out.read_text())
    assert set(result) == {"top1", "top5", "samples"} and result["samples"] == 150
    assert 0.0 <= result["top1"] <= result["top5"] <= 1.0


def test_min_top1_exits_3_when_missed_and_0_when_met(digits_dir: Path, compressed_file: Path, tmp_path: Path, run_cli) -> None:
    out = tmp_path / "eval.json"
    args = ["eval", compressed_file, "--data", digits_dir, "--workers", "0", "--json", out]
    assert run_cli(*args).code == 0
    top1 = json.loads(out.read_text())["top1"]
    out.unlink()
    missed = run_cli(*args, "--min-top1", f"{min(1.0, top1 + 0.01):.4f}")
    assert missed.code == 3
    assert out.exists()  # written before the budget check
    assert f"top-1 {top1:.3f} < budget" in missed.err
    assert run_cli(*args, "--min-top1", f"{top1:.4f}").code == 0


def test_an_original_checkpoint_is_evaluated_with_its_arch(digits_dir: Path, tmp_path: Path, run_cli) -> None:
    torch.manual_seed(0)
    path = tmp_path / "dense.pt"
    torch.save(digits.DigitsCNN().state_dict(), path)
    out = tmp_path / "eval.json"
    argv = ["eval", str(path), "--arch", digits.ARCH_SPEC, "--input-shape", "1,1,32,32", "--data", str(digits_dir),
            "--workers", "0", "--json", str(out)]
    assert run_cli(*argv).code == 0
    assert json.loads(out.read_text())["samples"] == 150


def test_a_missing_split_is_a_usage_error(digits_dir: Path, compressed_file: Path, run_cli) -> None:
    result = run_cli("eval", compressed_file, "--data", digits_dir, "--split", "test")
    assert result.code == 2 and "no 'test' split" in result.err


def test_more_classes_than_outputs_is_a_usage_error(tmp_path: Path, compressed_file: Path, run_cli) -> None:
    (tmp_path / "val" / "12").mkdir(parents=True)
    Image.new("L", (16, 16)).save(tmp_path / "val" / "12" / "0.png")
    result = run_cli("eval", compressed_file, "--data", tmp_path, "--workers", "0")
    assert result.code == 2 and "predicts 10 classes" in result.err
