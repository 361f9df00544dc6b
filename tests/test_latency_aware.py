"""--latency-aware keeps layers dense where the factorized form is not faster."""

from __future__ import annotations

import torch
from torch import nn

from lowrank_compress.compress import CompressConfig, compress
from lowrank_compress.layers import LowRankLinear


def _model() -> nn.Sequential:
    # A big layer at a tiny rank (much faster factorized) and a small one near its max useful rank
    # (two small matmuls instead of one: slower).
    return nn.Sequential(nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 64), nn.ReLU(), nn.Linear(64, 64)).eval()


def test_latency_aware_reverts_layers_that_are_not_faster():
    torch.manual_seed(0)
    model = _model()
    config = CompressConfig(rank=31, latency_aware=True, latency_batch_size=64, include="^(0|4)$", refine_steps=0)
    model, report = compress(model, config, torch.randn(1, 2048))
    kept = {layer.name for layer in report.layers}
    reverted = {s["name"]: s["reason"] for s in report.skipped if s["reason"].startswith("reverted by --latency-aware")}
    assert "0" in kept and isinstance(model[0], LowRankLinear)
    assert "4" in reverted and isinstance(model[4], nn.Linear)
    assert "ms" in reverted["4"]


def test_without_latency_aware_both_layers_are_factorized():
    model, report = compress(_model(), CompressConfig(rank=31, include="^(0|4)$"), torch.randn(1, 2048))
    assert {layer.name for layer in report.layers} == {"0", "4"}
