"""The embedded default: a small ReLU CNN trained on scikit-learn's 8×8 digits, upscaled to 32×32.

It is a real pretrained model that ships inside the package (``assets/``), small enough to compress,
evaluate and fine-tune on a CPU in seconds, and shaped like the models users bring: conv–BN–ReLU
blocks, a residual block (whose second conv reaches an add, not a ReLU) and a hidden Linear layer.

Data pipeline (``load_digits_split``): pixels 0…16 → divided by 16 into [0, 1] → bilinear upscale to
size×size → normalized with ``DIGITS_MEAN`` / ``DIGITS_STD`` (the mean and standard deviation of all
1797 digits' pixels at 8×8 after scaling to [0, 1], rounded to 4 digits) → a 70/30 train/test split,
stratified by class, fixed by the seed. Normalizing commutes with bilinear resizing (its weights sum
to 1), so a torchvision pipeline Resize → ToTensor → Normalize on the PNGs of ``write_image_folder``
sees the same inputs up to uint8 rounding.

Shipped files (written by ``benchmarks/train_digits.py``):
- ``assets/digits_cnn.safetensors``: the state dict; string metadata ``arch``, ``arch_kwargs`` (JSON),
  ``input_shape`` (JSON), ``num_classes``, ``test_accuracy``, ``seed``, ``epochs``, ``mean`` and
  ``std`` (JSON lists, one per channel).
- ``assets/digits_test.safetensors``: ``x_test`` float32 (N, 1, 32, 32), normalized; ``y_test`` int64 (N,).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..io.files import atomic_output

ARCH_SPEC = "lowrank_compress.examples.digits:DigitsCNN"
INPUT_SHAPE = (1, 1, 32, 32)
NUM_CLASSES = 10
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760
TEST_FRACTION = 0.3
DEFAULT_EPOCHS = 8

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
CHECKPOINT_NAME = "digits_cnn.safetensors"
TEST_SPLIT_NAME = "digits_test.safetensors"


def normalization() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) the inputs are normalized with, as torchvision's Normalize takes them."""
    return (DIGITS_MEAN,), (DIGITS_STD,)


class ConvBNReLU(nn.Sequential):
    """conv k×k (no bias: the BN after it carries the shift) → BatchNorm → ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()


class ResidualBlock(nn.Module):
    """relu(x + bn2(conv2(relu(bn1(conv1(x)))))), shape-preserving (B, C, H, W) → (B, C, H, W).

    Every ReLU is its own module, so hooks and graph tracing see which activation follows which layer.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(x + y)


class DigitsCNN(nn.Module):
    """(B, 1, 32, 32) normalized digits → (B, 10) logits; about 330 K parameters.

    stride-2 stem to 16×16 (32 ch) → stride-2 conv to 8×8 (64 ch) → residual block (64 ch) →
    stride-2 conv to 4×4 (128 ch) → conv (128 ch) → global average pool → Linear 128→128 → ReLU →
    Linear 128→10. The stem strides at once because the 32×32 input is an upscaled 8×8 image (it
    holds no finer detail), which keeps training to seconds on a CPU. Any input size works, since
    the pooling is global.
    """

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.stem = ConvBNReLU(1, 32, stride=2)
        self.down1 = ConvBNReLU(32, 64, stride=2)
        self.block = ResidualBlock(64)
        self.down2 = ConvBNReLU(64, 128, stride=2)
        self.conv = ConvBNReLU(128, 128)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(128, 128)
        self.fc_relu = nn.ReLU()
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(self.down2(self.block(self.down1(self.stem(x)))))
        return self.head(self.fc_relu(self.fc(self.flatten(self.pool(x)))))


def preprocess(images: torch.Tensor, size: int = 32) -> torch.Tensor:
    """Raw digits (N, 8, 8) with values 0…16 → normalized float32 inputs (N, 1, size, size)."""
    x = images.to(torch.float32).div(16.0).unsqueeze(1)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - DIGITS_MEAN) / DIGITS_STD


def load_digits_split(
    seed: int = 0, size: int = 32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's digits, preprocessed (see the module docstring) and split 70/30 by class.

    Returns (x_train (1257, 1, size, size), y_train (1257,), x_test (540, 1, size, size), y_test (540,)),
    inputs float32, labels int64. The same seed always gives the same split.
    """
    from sklearn.datasets import load_digits  # a dev dependency: only training and tests need it
    from sklearn.model_selection import train_test_split

    data = load_digits()
    train_idx, test_idx = train_test_split(
        np.arange(len(data.target)), test_size=TEST_FRACTION, random_state=seed, stratify=data.target
    )
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.target).to(torch.int64)
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    return (
        preprocess(images[train_idx], size),
        labels[train_idx],
        preprocess(images[test_idx], size),
        labels[test_idx],
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (put in eval mode) on inputs (N, …) with labels (N,)."""
    model.eval()
    correct = 0
    for start in range(0, len(x), batch_size):
        logits = model(x[start : start + batch_size])
        correct += int((logits.argmax(dim=1) == y[start : start + batch_size]).sum())
    return correct / len(x)


@contextlib.contextmanager
def deterministic(threads: int | None = None) -> Iterator[None]:
    """Deterministic kernels (and optionally a fixed thread count) inside the block; restored after."""
    was_enabled = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    old_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=was_warn_only)
        torch.set_num_threads(old_threads)


def train_digits_cnn(
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 5e-4,
    threads: int | None = 1,
) -> tuple[DigitsCNN, float]:
    """Train ``DigitsCNN`` on the seed's split on CPU; returns (model in eval mode, test accuracy).

    AdamW with a one-cycle learning-rate schedule and label smoothing, then BatchNorm statistics
    recomputed over the training set (``recalibrate_batchnorm``). The seed fixes the split, the
    initialization and the batch order, and kernels are deterministic, so a rerun with the same seed
    gives the same weights on the same torch build. One thread by default: the weights then do not
    depend on the machine's core count, and a model this small trains fastest that way (on a busy
    2-core machine, 2 threads took 30x longer than 1, spinning on each other).
    """
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    with deterministic(threads):
        torch.manual_seed(seed)
        model = DigitsCNN()
        steps_per_epoch = math.ceil(len(x_train) / batch_size)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.25
        )
        order = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(x_train), generator=order)
            for start in range(0, len(x_train), batch_size):
                idx = perm[start : start + batch_size]
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx], label_smoothing=0.1)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        recalibrate_batchnorm(model, x_train, batch_size)
        return model.eval(), accuracy(model, x_test, y_test)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> None:
    """Replace every BatchNorm's running statistics by their plain average over inputs ``x`` (N, …).

    The exponential running averages lag the weights, badly so after a short or high-learning-rate
    run (one epoch at batch 64 evaluated at 14% before this, 96% after); the average over one pass
    with the final weights is what eval mode should use.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # None makes BatchNorm keep a cumulative average
    model.train()
    for start in range(0, len(x), batch_size):
        model(x[start : start + batch_size])
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    model.eval()


def write_image_folder(root: str | os.PathLike, x: torch.Tensor, y: torch.Tensor, split_name: str) -> Path:
    """Write normalized inputs (N, 1, H, W) as grayscale PNGs ``root/<split_name>/<label>/<index>.png``.

    The ImageNet layout: one folder per class, named by the digit. Pixels are de-normalized and
    rounded to uint8. Returns the split folder.
    """
    split_dir = Path(root) / split_name
    pixels = (x[:, 0] * DIGITS_STD + DIGITS_MEAN).clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).numpy()
    for label in range(NUM_CLASSES):
        (split_dir / str(label)).mkdir(parents=True, exist_ok=True)
    for index, (image, label) in enumerate(zip(pixels, y.tolist())):
        Image.fromarray(image, mode="L").save(split_dir / str(label) / f"{index}.png")
    return split_dir


def save_checkpoint(model: DigitsCNN, path: str | os.PathLike, *, test_accuracy: float, seed: int, epochs: int) -> None:
    """Write the state dict as safetensors with the metadata that describes it (module docstring)."""
    metadata = {
        "arch": ARCH_SPEC,
        "arch_kwargs": json.dumps({}),
        "input_shape": json.dumps(list(INPUT_SHAPE)),
        "num_classes": str(NUM_CLASSES),
        "test_accuracy": repr(test_accuracy),
        "seed": str(seed),
        "epochs": str(epochs),
        "mean": json.dumps([DIGITS_MEAN]),
        "std": json.dumps([DIGITS_STD]),
    }
    tensors = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    with atomic_output(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_test_split(path: str | os.PathLike, x_test: torch.Tensor, y_test: torch.Tensor) -> None:
    """Write the held-out split: ``x_test`` float32 (N, 1, 32, 32), ``y_test`` int64 (N,)."""
    with atomic_output(path) as tmp:
        save_file({"x_test": x_test.contiguous(), "y_test": y_test.contiguous()}, str(tmp))


def bundled_checkpoint_path() -> Path:
    """Path of the shipped checkpoint ``assets/digits_cnn.safetensors``."""
    return ASSETS_DIR / CHECKPOINT_NAME


def bundled_test_split_path() -> Path:
    """Path of the shipped held-out split ``assets/digits_test.safetensors``."""
    return ASSETS_DIR / TEST_SPLIT_NAME


def bundled_metadata() -> dict[str, str]:
    """The shipped checkpoint's string metadata, read from the header without loading tensors."""
    with safe_open(str(bundled_checkpoint_path()), framework="pt") as f:
        return dict(f.metadata())


def load_bundled() -> tuple[DigitsCNN, torch.Tensor, torch.Tensor]:
    """The shipped model (eval mode, loaded strictly) and its held-out split (x_test, y_test)."""
    model = DigitsCNN()
    model.load_state_dict(load_file(str(bundled_checkpoint_path())), strict=True)
    split = load_file(str(bundled_test_split_path()))
    return model.eval(), split["x_test"], split["y_test"]
