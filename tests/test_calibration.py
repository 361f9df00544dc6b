"""Calibration-aware projection: statistics, asymmetric reconstruction, guards, end-to-end quality."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowrank_compress.calibdata import calibration_batches
from lowrank_compress.calibration import calibrated_compress
from lowrank_compress.responses import ResponseStats, patches, response_projection, responses
from lowrank_compress.compress import CompressConfig, compress
from lowrank_compress.graph import find_sites
from lowrank_compress.projection import factorize


class ConvBlockNet(nn.Module):
    """conv–BN–ReLU ×2, then a Linear head: small, with BN folding on every conv."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 24, 3, padding=1)
        self.b1 = nn.BatchNorm2d(24)
        self.c2 = nn.Conv2d(24, 32, 3, stride=2, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    return model.eval()


def test_response_stats_match_direct_computation_on_a_conv_layer():
    torch.manual_seed(0)
    model = _randomize_bn(ConvBlockNet())
    site = next(s for s in find_sites(model, torch.randn(1, 3, 12, 12)) if s.name == "c2")
    stats = ResponseStats.empty(32)
    chunks = []
    for _ in range(3):
        x = torch.randn(5, 24, 12, 12)
        rows = responses(site, model.c2(x))
        stats.update(rows)
        chunks.append(rows.double())
    direct = torch.cat(chunks)
    assert stats.count == direct.shape[0] == 3 * 5 * 6 * 6
    assert torch.allclose(stats.mean, direct.mean(0), atol=1e-6)
    assert torch.allclose(stats.covariance, torch.cov(direct.T), atol=1e-5, rtol=1e-5)


def test_patches_reproduce_the_convolution():
    torch.manual_seed(0)
    for conv in (
        nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1),
        nn.Conv2d(4, 6, 3, padding=2, dilation=2, padding_mode="reflect"),
        nn.Conv2d(4, 6, 3, padding="same"),
        nn.Conv1d(4, 6, 5, stride=2, padding=2),
    ):
        x = torch.randn(2, 4, 9, 9) if isinstance(conv, nn.Conv2d) else torch.randn(2, 4, 17)
        model = nn.Sequential(conv).eval()
        site = find_sites(model, x)[0]
        rows = patches(site, x) @ conv.weight.reshape(6, -1).T + conv.bias
        assert torch.allclose(rows, responses(site, conv(x)), atol=1e-5)


def test_response_projection_at_full_rank_on_identity_reproduces_the_layer():
    torch.manual_seed(0)
    w, b = torch.randn(12, 20, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    x = torch.randn(4000, 20, dtype=torch.float64)
    stats = ResponseStats.empty(12)
    stats.update(x @ w.T + b)
    f = response_projection(w, b, stats, 12, "identity")
    assert torch.allclose(f.A @ f.B, w, atol=1e-8)
    assert torch.allclose(f.bias, b, atol=1e-8)


def test_asymmetric_calibration_sees_the_compressed_upstream_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    reference = copy.deepcopy(model)
    batches = [torch.randn(64, 16) for _ in range(4)]
    sites = find_sites(model, batches[0][:1])
    seen: dict[str, torch.Tensor] = {}
    config = CompressConfig(rank=3, refine_steps=0, distill_steps=0)
    calibrated_compress(model, sites, config, batches[0][:1], batches, observer=lambda n, x, y: seen.setdefault(n, x))
    # Layer "2" was calibrated after layer "0" had been replaced: its inputs are relu(compressed_0(x)).
    with torch.no_grad():
        compressed_hidden = torch.cat([torch.relu(model[0](b)) for b in batches])
        original_hidden = torch.cat([torch.relu(reference[0](b)) for b in batches])
    rows = seen["2"]

    def nearest(pool: torch.Tensor) -> float:
        return float(torch.cdist(rows, pool, compute_mode="donot_use_mm_for_euclid_dist").min(1).values.max())

    assert nearest(compressed_hidden) < 1e-5
    assert nearest(original_hidden) > 1e-2


def _decaying_mlp(dims: list[int], seed: int) -> nn.Sequential:
    """A ReLU MLP whose weights have decaying spectra, like trained layers (so rank matters)."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        linear = nn.Linear(dims[i], dims[i + 1])
        u, _, v = torch.linalg.svd(torch.randn(dims[i + 1], dims[i], generator=gen), full_matrices=False)
        spectrum = 3.0 * torch.exp(-torch.arange(min(dims[i], dims[i + 1])) / 6.0)
        linear.weight.data = (u * spectrum) @ v
        layers += [linear, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_asymmetric_calibration_beats_calibrating_on_original_inputs(seed):
    torch.manual_seed(seed)
    model = _decaying_mlp([32, 64, 64, 64, 10], seed)
    batches = [torch.randn(128, 32) for _ in range(4)]
    test = torch.randn(512, 32)
    errors = {}
    for asymmetric in (True, False):
        m = copy.deepcopy(model)
        sites = find_sites(m, batches[0][:1])
        config = CompressConfig(rank=4, refine_steps=50, distill_steps=0)
        calibrated_compress(m, sites, config, batches[0][:1], batches, asymmetric=asymmetric)
        with torch.no_grad():
            errors[asymmetric] = float((m(test) - model(test)).norm() / model(test).norm())
    assert errors[True] < errors[False] - 0.005


def test_kept_candidate_is_never_worse_than_spectral_on_held_out_samples():
    torch.manual_seed(0)
    model = _randomize_bn(ConvBlockNet())
    batches = [torch.randn(16, 3, 12, 12) for _ in range(2)]
    _, report = compress(model, CompressConfig(rank_ratio=0.25, refine_steps=30), batches[0][:1], calibration=batches)
    assert report.layers
    for layer in report.layers:
        assert set(layer.candidates) >= {"spectral", "nkp", "nkp_calibrated", "spectral+refine"}
        assert all(np.isfinite(v) for v in layer.candidates.values())
        assert layer.candidates[layer.method] <= layer.candidates["spectral"] + 1e-12


def test_sigmoid_classifier_at_tiny_rank_stays_bounded():
    """docs/design.md §3 (6): an unguarded Gaussian row fit blew up on a sigmoid layer at low rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 64), nn.Sigmoid()).eval()
    with torch.no_grad():
        model[0].bias.mul_(20.0)  # far from the Gaussian regime
    batches = [torch.randn(64, 40) * 3 + 1 for _ in range(3)]
    reference = copy.deepcopy(model)
    _, report = compress(model, CompressConfig(rank=1, refine_steps=50), batches[0][:1], calibration=batches)
    layer = report.layers[0]
    assert layer.candidates[layer.method] <= layer.candidates["spectral"]
    with torch.no_grad():
        out, ref = model(batches[0]), reference(batches[0])
    assert torch.isfinite(out).all()
    spectral = factorize(reference[0].weight, 1, "spectral", "identity", reference[0].bias)
    with torch.no_grad():
        spec_out = torch.sigmoid(batches[0] @ (spectral.A @ spectral.B).T + spectral.bias)
    assert float((out - ref).pow(2).mean()) <= float((spec_out - ref).pow(2).mean()) * 1.05


def test_calibration_tensor_of_the_wrong_shape_is_a_usage_error(tmp_path):
    np.save(tmp_path / "calib.npy", np.zeros((4, 3, 8, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"samples of shape \(3, 8, 8\)"):
        calibration_batches(str(tmp_path / "calib.npy"), (1, 1, 32, 32), {}, 4, 2)


def test_calibration_folder_with_an_unreadable_image_is_reported_by_name(tmp_path, run_cli):
    from PIL import Image

    from lowrank_compress.examples.digits import bundled_checkpoint_path

    folder = tmp_path / "calib" / "0"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((32, 32), 40 * i, dtype=np.uint8)).save(folder / f"ok{i}.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    out = tmp_path / "out.lrc.safetensors"
    result = run_cli("compress", bundled_checkpoint_path(), "--rank", "4", "--calib", tmp_path / "calib", "-o", out, "--quiet")
    assert result.code == 2
    assert not out.exists()


def test_calibration_folder_error_message_names_the_file(tmp_path, run_cli):
    from PIL import Image

    from lowrank_compress.examples.digits import bundled_checkpoint_path

    folder = tmp_path / "calib"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(folder / "good.png")
    (folder / "corrupt.jpg").write_bytes(b"garbage")
    err = run_cli("compress", bundled_checkpoint_path(), "--rank", "4", "--calib", folder,
                  "-o", tmp_path / "o.lrc.safetensors", "--quiet").err
    assert "corrupt.jpg" in err
    assert len([line for line in err.strip().splitlines() if line.strip()]) == 1


@pytest.mark.slow
def test_calibrated_nkp_keeps_the_bundled_digits_model_accuracy_at_a_quarter_of_its_params():
    from lowrank_compress.examples.digits import accuracy, load_bundled, load_digits_split

    model, x_test, y_test = load_bundled()
    base = accuracy(model, x_test, y_test)
    x_train = load_digits_split()[0]
    calib = list(x_train[:256].split(64))
    spectral, _ = compress(copy.deepcopy(model), CompressConfig(method="spectral", target_params=0.25), x_test[:1])
    nkp, report = compress(copy.deepcopy(model), CompressConfig(target_params=0.25), x_test[:1], calibration=calib)
    assert report.params_after <= 0.25 * report.params_before
    acc_nkp, acc_spectral = accuracy(nkp, x_test, y_test), accuracy(spectral, x_test, y_test)
    assert acc_nkp >= base - 0.02
    assert acc_nkp >= acc_spectral + 0.10


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc (Linux)")
def test_heap_trimmer_trims_after_growth_only():
    from lowrank_compress.modelrun import HeapTrimmer

    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    idle = HeapTrimmer(slack=1e12)
    assert idle.resident() == pytest.approx(int(status["VmRSS"].split()[0]) * 1024, rel=0.1)
    floor = idle.floor
    idle()
    assert idle.floor == floor  # no terabyte of growth: nothing to do
    eager = HeapTrimmer(slack=0)
    live = torch.ones(50_000_000)  # 200 MB
    eager()  # trims: the floor becomes the resident size after trimming
    assert eager.floor == pytest.approx(eager.resident(), abs=64e6)
    assert eager.floor > live.numel() * 4
