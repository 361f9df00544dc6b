"""Plots: per-layer error-vs-rank curves recorded by compress, and valid PNG figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from lowrank_compress.examples import digits
from lowrank_compress.cli import main
from lowrank_compress.compress import CompressConfig, compress
from lowrank_compress.errors import UsageError
from lowrank_compress.plots import plot_accuracy_vs_params, plot_compression

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"



def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10))


def _compressed(curves: bool):
    return compress(_mlp(), CompressConfig(rank_ratio=0.25), torch.randn(2, 48), curves=curves)[1]


def _assert_png(path: Path, min_bytes: int = 10_000) -> tuple[int, int]:
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert path.stat().st_size > min_bytes
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def test_compress_records_spectral_and_nkp_curves_through_the_chosen_rank_on_request() -> None:
    report = _compressed(curves=True)
    assert report.layers
    for layer in report.layers:
        assert set(layer.curves) == {"spectral", "nkp"}
        for curve in layer.curves.values():
            assert layer.rank in curve["ranks"] and curve["ranks"] == sorted(curve["ranks"])
            assert len(curve["errors"]) == len(curve["ranks"])
            assert all(0.0 <= e <= 1.0 for e in curve["errors"])
            assert curve["errors"][0] > curve["errors"][-1]  # error falls as the rank grows


def test_nkp_curve_is_never_above_spectral_for_relu_layers() -> None:
    for layer in _compressed(curves=True).layers:
        if layer.activation == "relu":
            pairs = zip(layer.curves["nkp"]["errors"], layer.curves["spectral"]["errors"])
            assert all(nkp <= spectral + 1e-9 for nkp, spectral in pairs)


def test_curves_at_the_chosen_rank_match_the_reported_data_free_errors() -> None:
    for layer in _compressed(curves=True).layers:
        at = layer.curves["spectral"]["ranks"].index(layer.rank)
        assert layer.curves["spectral"]["errors"][at] == pytest.approx(layer.error_spectral, rel=1e-6, abs=1e-9)
        assert layer.curves["nkp"]["errors"][at] == pytest.approx(layer.error_nkp, rel=1e-3, abs=1e-6)


def test_curves_cost_nothing_unless_asked_for() -> None:
    assert all(layer.curves == {} for layer in _compressed(curves=False).layers)


def test_plot_compression_writes_a_png_with_one_panel_per_layer(tmp_path: Path) -> None:
    path = tmp_path / "layers.png"
    plot_compression(_compressed(curves=True), path)
    width, height = _assert_png(path)
    assert width > 300 and height > 200
    assert [p.name for p in tmp_path.iterdir()] == ["layers.png"]  # no temporary file left


def test_plot_compression_without_curves_still_marks_the_chosen_ranks(tmp_path: Path) -> None:
    path = tmp_path / "markers.png"
    plot_compression(_compressed(curves=False), path)
    _assert_png(path)


def test_plot_of_a_report_with_no_factorized_layer_is_still_a_png(tmp_path: Path) -> None:
    report = _compressed(curves=False)
    report.layers = []
    plot_compression(report, tmp_path / "empty.png")
    _assert_png(tmp_path / "empty.png", min_bytes=1_000)


def test_plot_into_a_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="does not exist"):
        plot_compression(_compressed(curves=False), tmp_path / "missing" / "x.png")


def test_plot_accuracy_vs_params_draws_methods_and_the_reference(tmp_path: Path) -> None:
    rows = [
        {"method": "spectral", "params": 80_000, "accuracy": 0.52},
        {"method": "spectral", "params": 160_000, "accuracy": 0.99},
        {"method": "nkp", "params": 160_000, "accuracy": 0.998},
        {"method": "nkp", "params": 80_000, "accuracy": 0.998},
    ]
    path = tmp_path / "acc.png"
    plot_accuracy_vs_params(rows, path, reference={"method": "original", "params": 330_000, "accuracy": 0.998})
    _assert_png(path)


def test_lrc_compress_plot_writes_a_png(tmp_path: Path) -> None:
    plot = tmp_path / "digits.png"
    main(["compress", str(digits.bundled_checkpoint_path()), "--rank-ratio", "0.25", "--method", "spectral",
          "-o", str(tmp_path / "digits.lrc.safetensors"), "--plot", str(plot), "-q"])
    _assert_png(plot)
