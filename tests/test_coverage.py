"""Coverage across the registries: compress → save → load → forward.

Each case goes the way a user's model does (``benchmarks/coverage.py``): random weights saved as
safetensors, ``lrc compress --arch SPEC --rank-ratio 0.5`` data-free, ``lowrank_compress.load``,
one forward pass with finite outputs of the original shape. The default run takes the seven
architectures the issue found failing in shrunk configurations (fewer blocks, 64×64 inputs); the
slow run takes them at their registry configurations; the benchmark sweeps ~100 architectures.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

_BENCHMARK = Path(__file__).parents[1] / "benchmarks" / "coverage.py"
_spec = importlib.util.spec_from_file_location("lrc_coverage_benchmark", _BENCHMARK)
coverage = sys.modules[_spec.name] = importlib.util.module_from_spec(_spec)  # dataclasses look it up there
_spec.loader.exec_module(coverage)

# arch → (shrinking kwargs, what used to break, a factorized layer that shows the fix)
SHRUNK = {
    "timm:eva02_tiny_patch14_224": ({"depth": 2, "img_size": 56}, "F.linear(x, self.qkv.weight, bias)",
                                    "blocks.0.attn.qkv"),
    "torchvision.models.swin_transformer:SwinTransformer": (
        {"patch_size": [4, 4], "embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2], "window_size": [4, 4],
         "num_classes": 10},
        "torchvision's shifted_window_attention(x, self.qkv.weight, ...)", "features.1.0.attn.qkv"),
    "timm:xcit_nano_12_p16_224": ({"depth": 1}, "token_projection.weight.dtype", "pos_embed.token_projection"),
    "timm:edgenext_xx_small": ({"depths": [1, 1, 1, 1]}, "conv .weight read by model code",
                               "stages.0.blocks.0.mlp.fc1"),
    "timm:cait_xxs24_224": ({"depth": 1, "img_size": 64}, "FLOP counting of cls_token.expand under no_grad",
                            "blocks.0.attn.qkv"),
    "timm:pit_ti_224": ({"depth": [1, 1, 1], "img_size": 64}, "FLOP counting of cls_token.expand under no_grad",
                        "transformers.0.blocks.0.attn.qkv"),
    "torchvision:mnasnet0_5": ({}, "state-dict version metadata lost on load", "layers.0"),
}


@pytest.mark.parametrize("arch", list(SHRUNK), ids=[a.split(":")[-1] for a in SHRUNK])
def test_an_architecture_the_issue_found_failing_compresses_saves_loads_and_runs(arch, tmp_path):
    kwargs, _, layer = SHRUNK[arch]
    result = coverage.check(arch, tmp_path, kwargs, load_with_arch=bool(kwargs))
    assert result.ok, result.error
    assert layer in result.factorized


class SubclassedLayersNet(nn.Module):
    """timm's layer subclasses: Conv2dSame pads at run time (it must stay dense); timm's Linear only
    casts for TorchScript (it is factorized, and the saved file must load again)."""

    def __init__(self):
        super().__init__()
        from timm.layers import Conv2dSame, Linear

        self.stem = Conv2dSame(3, 16, 3, stride=2)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.head = Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.stem(x))))
        return self.head(x.mean((2, 3)))


def test_layer_subclasses_stay_dense_or_round_trip_by_what_their_forward_does(tmp_path):
    result = coverage.check("test_coverage:SubclassedLayersNet", tmp_path, load_with_arch=True)
    assert result.ok, result.error
    assert result.factorized == ["conv", "head"]


def test_a_file_holding_shared_tensors_once_loads_against_its_architecture(tmp_path):
    # safetensors' save_model keeps one name per shared tensor (timm's CoaT shares convs across blocks)
    from models import TiedNet
    from safetensors import safe_open
    from safetensors.torch import save_model

    from lowrank_compress.io.opening import open_model

    model = TiedNet().eval()
    save_model(model, str(tmp_path / "tied.safetensors"))
    with safe_open(str(tmp_path / "tied.safetensors"), "pt") as f:
        assert len(list(f.keys())) < len(model.state_dict())
    loaded = open_model(tmp_path / "tied.safetensors", "models:TiedNet").model
    x = torch.randn(3, 24)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


FAILING_IN_ISSUE = ["timm:edgenext_xx_small", "timm:xcit_nano_12_p16_224", "timm:eva02_tiny_patch14_224",
                    "torchvision:swin_t", "timm:cait_xxs24_224", "timm:pit_ti_224", "torchvision:mnasnet0_5"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", FAILING_IN_ISSUE, ids=[a.split(":")[-1] for a in FAILING_IN_ISSUE])
def test_the_failing_architectures_at_their_registry_configuration(arch, tmp_path):
    result = coverage.check(arch, tmp_path)
    assert result.ok, result.error


def test_the_benchmark_list_covers_the_issues_failing_architectures():
    assert set(FAILING_IN_ISSUE) <= set(coverage.ARCHITECTURES)
    assert len(set(coverage.ARCHITECTURES)) == len(coverage.ARCHITECTURES) >= 100
