"""Tiny test models, the table of architectures the tests run on, and the in-process CLI runner.

The models are importable as ``models:NAME`` (pytest puts tests/ on sys.path), so the CLI and the
manifest can name them like any ``package.module:callable`` architecture; the suite allows the
module the way a user would, with ``LRC_TRUSTED_MODULES`` (see the repository's conftest.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------- tiny models


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial eval statistics, so that folding it matters."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                c = module.num_features
                module.weight.copy_(0.5 + torch.rand(c, generator=gen))
                module.bias.copy_(0.2 * torch.randn(c, generator=gen))
                module.running_mean.copy_(0.1 * torch.randn(c, generator=gen))
                module.running_var.copy_(0.5 + torch.rand(c, generator=gen))
    return model


class MLP(nn.Module):
    """Linear → ReLU(inplace) → Linear → Tanh → Dropout → Linear → leaky_relu(0.2) → Linear."""

    def __init__(self, d_in: int = 48, hidden: int = 96, classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.act1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, hidden)
        self.act2 = nn.Tanh()
        self.drop = nn.Dropout(0.1)
        self.fc3 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.fc1(x))
        x = self.drop(self.act2(self.fc2(x)))
        x = F.leaky_relu(self.fc3(x), 0.2)
        return self.head(x)


class FunctionalNet(nn.Module):
    """Functional style: F.pad / F.relu / torch.relu / F.gelu, with BatchNorm *after* the ReLU."""

    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * channels)
        self.fc1 = nn.Linear(2 * channels, 64)
        self.fc2 = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn1(F.relu(self.conv1(F.pad(x, (1, 1, 1, 1), mode="reflect"))))
        x = F.max_pool2d(x, 2)
        x = self.bn2(torch.relu(F.pad(self.conv2(x), (1, 1, 1, 1))))
        x = x.mean((2, 3))
        return self.fc2(F.gelu(self.fc1(x)))


class ConvBNNet(nn.Module):
    """Conv → BN → ReLU twice, then a linear head (a plain CNN with BN before the activation)."""

    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * channels)
        self.head = nn.Linear(2 * channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


class TiedNet(nn.Module):
    """``shared`` is one module reachable under two names and called twice; ``c``/``d`` share a weight."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(24, 64)
        self.shared = nn.Linear(64, 64)
        self.alias = self.shared
        self.c = nn.Linear(64, 32)
        self.d = nn.Linear(64, 32)
        self.d.weight = self.c.weight
        self.out = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inp(x))
        h = torch.relu(self.shared(h))
        h = torch.relu(self.alias(h))
        return self.out(torch.cat([self.c(h), self.d(h)], 1))


def make_mlp(d_in: int = 48, hidden: int = 96, classes: int = 10) -> MLP:
    """A factory function (not a class): a file's manifest may not name it."""
    return MLP(d_in, hidden, classes)


# ---------------------------------------------------------------- the model table


@dataclass(frozen=True)
class ModelCase:
    """One architecture of the test table: a model, its input shape and what the walker must find in it."""

    arch: str
    input_shape: tuple[int, ...]
    # layer name → (activation, bn_before name or None, affine_after name or None); a string value is a
    # skip reason fragment the layer must be skipped with.
    expect: dict
    arch_kwargs: dict | None = None
    exclude: str | None = None

    def build(self) -> nn.Module:
        from lowrank_compress.io.archspec import build_model

        torch.manual_seed(0)
        return randomize_batchnorm(build_model(self.arch, self.arch_kwargs or {})).eval()

    def cli_args(self) -> list[str]:
        args = ["--arch", self.arch, "--input-shape", ",".join(map(str, self.input_shape))]
        if self.arch_kwargs:
            args += ["--arch-kwargs", json.dumps(self.arch_kwargs)]
        if self.exclude:
            args += ["--exclude", self.exclude]
        return args


IMG = (1, 3, 64, 64)
MODEL_CASES = {
    "tv_resnet18": ModelCase("torchvision:resnet18", IMG, {
        "conv1": ("relu", "bn1", None),
        "layer1.0.conv1": ("relu", "layer1.0.bn1", None),
        "layer1.0.conv2": ("identity", "layer1.0.bn2", None),  # residual add before the ReLU
        "layer2.0.downsample.0": ("identity", "layer2.0.downsample.1", None),
        "fc": ("identity", None, None),
    }),
    "tv_resnet50": ModelCase("torchvision:resnet50", IMG, {
        "conv1": ("relu", "bn1", None),
        "layer1.0.conv2": ("relu", "layer1.0.bn2", None),
        "layer1.0.conv3": ("identity", "layer1.0.bn3", None),
        "layer3.2.conv3": ("identity", "layer3.2.bn3", None),
    }),
    "tv_mobilenet_v3_small": ModelCase("torchvision:mobilenet_v3_small", IMG, {
        "features.0.0": ("hardswish", "features.0.1", None),
        "features.1.block.0.0": "depthwise",
        "features.1.block.1.fc1": ("relu", None, None),
        "features.1.block.1.fc2": ("hardsigmoid", None, None),
        "features.4.block.0.0": ("hardswish", "features.4.block.0.1", None),
        "classifier.0": ("hardswish", None, None),
        "classifier.3": ("identity", None, None),
    }),
    "tv_vgg11_bn": ModelCase("torchvision:vgg11_bn", IMG, {
        "features.0": ("relu", "features.1", None),
        "features.25": ("relu", "features.26", None),
        "classifier.0": ("relu", None, None),
        "classifier.3": ("relu", None, None),
        "classifier.6": ("identity", None, None),
    }, exclude="classifier"),  # the 4096×25088 classifier is slow to factorize on 2 cores
    "timm_resnet50": ModelCase("timm:resnet50", IMG, {
        "conv1": ("relu", "bn1", None),
        "layer1.0.conv1": ("relu", "layer1.0.bn1", None),
        "layer1.0.conv3": ("identity", "layer1.0.bn3", None),
        "fc": ("identity", None, None),
    }),
    "timm_efficientnet_b0": ModelCase("timm:efficientnet_b0", IMG, {
        "conv_stem": ("silu", "bn1", None),
        "blocks.0.0.conv_dw": "depthwise",
        "blocks.0.0.se.conv_reduce": ("silu", None, None),
        "blocks.0.0.se.conv_expand": ("sigmoid", None, None),
        "blocks.1.0.conv_pw": ("silu", "blocks.1.0.bn1", None),
        "blocks.1.0.conv_pwl": ("identity", "blocks.1.0.bn3", None),
        "conv_head": ("silu", "bn2", None),
    }),
    "timm_vit_tiny": ModelCase("timm:vit_tiny_patch16_224", IMG, {
        "blocks.0.attn.qkv": ("identity", None, None),
        "blocks.0.attn.proj": ("identity", None, None),
        "blocks.0.mlp.fc1": ("gelu", None, None),
        "blocks.0.mlp.fc2": ("identity", None, None),
        "blocks.11.mlp.fc1": ("gelu", None, None),
    }, arch_kwargs={"img_size": 64}),
    "timm_convnext_atto": ModelCase("timm:convnext_atto", IMG, {
        "stages.0.blocks.0.conv_dw": "depthwise",
        "stages.0.blocks.0.mlp.fc1": ("gelu", None, None),
        "stages.0.blocks.0.mlp.fc2": ("identity", None, None),
        "stages.3.blocks.1.mlp.fc1": ("gelu", None, None),
    }),
    "mlp": ModelCase("models:MLP", (2, 48), {
        "fc1": ("relu", None, None),
        "fc2": ("tanh", None, None),
        "fc3": ("leaky_relu(0.2)", None, None),
        "head": ("identity", None, None),
    }),
    "functional": ModelCase("models:FunctionalNet", (1, 3, 32, 32), {
        "conv1": ("relu", None, "bn1"),
        "conv2": ("relu", None, "bn2"),
        "fc1": ("gelu", None, None),
        "fc2": ("identity", None, None),
    }),
}


def saved_param_count(path: Path, model: nn.Module) -> int:
    """Elements of the tensors in a safetensors file that are parameters of ``model`` (not buffers)."""
    from safetensors import safe_open

    buffers = {name for name, _ in model.named_buffers()}
    total = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if key not in buffers:
                total += math.prod(f.get_slice(key).get_shape())
    return total


# ---------------------------------------------------------------- helpers


@dataclass
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.strip()]


def invoke_cli(capture: Any, *args: str | Path) -> CliResult:
    """Run ``lrc ARGS`` in-process; ``capture`` is pytest's capsys or capfd: exit code, stdout, stderr."""
    from lowrank_compress.cli import main

    capture.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capture.readouterr()
    return CliResult(code, out, err)


def one_error_line(err: str) -> str:
    """The one ``error: …`` line of ``err`` (blank lines aside); fails on anything else."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    return lines[0]
