"""Numerical robustness of whole-model compression.

Dead channels, constant (singular-covariance) responses, duplicate rows, an all-zero layer, half
precision checkpoints, tied modules and very large layers — data-free and calibrated, nkp and
spectral. Every test checks that no factor and no output is NaN or Inf, and what the result must be.
(The per-matrix math of the same cases is in test_projection.py.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from models import TiedNet
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lowrank_compress.examples import digits
from lowrank_compress import factors, gaussian, projection
from lowrank_compress.compress import CompressConfig, compress
from lowrank_compress.graph import find_sites
from lowrank_compress.layers import LOW_RANK_TYPES
from lowrank_compress.io.format import MANIFEST_KEY, load

METHODS = ["nkp", "spectral"]
MODES = ["data-free", "calibrated"]


def finite_model(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point())


def relative_error(reference: torch.Tensor, output: torch.Tensor) -> float:
    return float((output.double() - reference.double()).norm() / reference.double().norm())


def _compress(model: nn.Module, example: torch.Tensor, mode: str, method: str, rank: int,
              calibration: list[torch.Tensor] | None = None):
    if mode == "calibrated" and calibration is None:
        calibration = [torch.randn((32, *example.shape[1:]), generator=torch.Generator().manual_seed(1))]
    # The fits are under test: no distillation afterwards (its own guard is tested below).
    config = CompressConfig(rank=rank, method=method, refine_steps=20, distill_steps=0)
    return compress(model, config, example, calibration=calibration if mode == "calibrated" else None)


class DeadNet(nn.Module):
    """Conv → BN → ReLU → mean → Linear → ReLU → Linear, with dead channels of three kinds."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16, 64)
        self.fc2 = nn.Linear(64, 10)
        with torch.no_grad():
            self.conv.weight[:4] = 0.0  # channels 0–3: zero rows, zero bias
            self.conv.bias[:4] = 0.0
            self.bn.weight[4:6] = 0.0  # channels 4–5: BatchNorm scales them to zero
            self.bn.running_var.uniform_(0.5, 1.5)
            self.fc1.weight[:16] = 0.0  # units 0–15: zero rows, zero bias
            self.fc1.bias[:16] = 0.0

    def hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        conv = self.conv(x)
        return conv, self.fc1(torch.relu(self.bn(conv)).mean((2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.hidden(x)[1]))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", MODES)
def test_dead_channels_stay_exactly_dead_and_everything_is_finite(mode, method):
    torch.manual_seed(0)
    model = DeadNet().eval()
    x = torch.randn(8, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(x)
    model, report = _compress(model, x[:1], mode, method, rank=3)
    assert {layer.name for layer in report.layers} == {"conv", "fc1", "fc2"}
    assert all(isinstance(getattr(model, n), LOW_RANK_TYPES) for n in ("conv", "fc1", "fc2"))
    assert finite_model(model)
    with torch.no_grad():
        conv, hidden = model.hidden(x)
        output = model(x)
    assert torch.isfinite(output).all()
    assert float(conv[:, :4].abs().max()) == 0.0  # no spurious signal where the original has none
    assert float(hidden[:, :16].abs().max()) == 0.0
    assert relative_error(reference, output) < 1.0  # better than predicting zero


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("value", [0.0, 1.0])
def test_constant_calibration_inputs_singular_covariance_are_reproduced(method, value):
    # Every calibration sample is the same: each layer's response covariance is exactly zero.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10)).eval()
    constant = torch.full((64, 32), value)
    with torch.no_grad():
        reference = model(constant[:4])
    model, report = _compress(model, constant[:1], "calibrated", method, rank=4, calibration=[constant])
    assert len(report.layers) == 3 and finite_model(model)
    with torch.no_grad():
        output = model(constant[:4])
        elsewhere = model(torch.randn(16, 32))
    assert torch.isfinite(elsewhere).all()
    if method == "nkp":  # the calibrated projection puts the constant response in the bias
        assert relative_error(reference, output) < 1e-5
    else:
        assert torch.isfinite(output).all() and relative_error(reference, output) < 1.0


def test_distillation_on_identical_calibration_samples_keeps_the_model_finite_and_no_worse():
    # Default (automatic) distillation on 64 copies of one input: nothing to learn beyond that input.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    constant = torch.full((64, 32), 0.5)
    model, report = compress(model, CompressConfig(rank=4, refine_steps=20), constant[:1], calibration=[constant])
    assert finite_model(model) and torch.isfinite(model(torch.randn(8, 32))).all()
    distilled = report.distillation
    assert distilled["steps"] > 0 and distilled["schedule"].startswith("auto")
    assert distilled["after"] <= distilled["before"]


def test_a_constant_input_feature_gives_finite_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()
    calibration = torch.randn(64, 32)
    calibration[:, 16:] = 3.0  # half the input features never vary
    model, _ = _compress(model, calibration[:1], "calibrated", "nkp", rank=4, calibration=[calibration])
    assert finite_model(model)
    assert torch.isfinite(model(torch.randn(8, 32))).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", MODES)
def test_duplicate_rows_a_rank_k_layer_is_reproduced_at_rank_k(mode, method):
    # 64 output rows that are 6 distinct rows repeated: the weight has rank 6, so rank 6 loses nothing.
    torch.manual_seed(0)
    layer = nn.Linear(40, 64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(6, 40)[torch.arange(64) % 6])
        layer.bias.copy_(torch.randn(6)[torch.arange(64) % 6])
    model = nn.Sequential(layer, nn.ReLU()).eval()
    x = torch.randn(32, 40)
    with torch.no_grad():
        reference = model(x)
    model, report = _compress(model, x[:1], mode, method, rank=6)
    assert report.layers[0].rank == 6 and finite_model(model)
    with torch.no_grad():
        assert relative_error(reference, model(x)) < 1e-5


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", MODES)
def test_an_all_zero_layer_compresses_to_its_bias(mode, method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 5)).eval()
    with torch.no_grad():
        model[2].weight.zero_()
    bias = model[2].bias.detach().clone()
    x = torch.randn(16, 24)
    model, report = _compress(model, x[:1], mode, method, rank=4)
    assert "2" in {layer.name for layer in report.layers} and finite_model(model)
    with torch.no_grad():
        middle = model[2](model[1](model[0](x)))  # whatever the input, the layer outputs its bias
        assert torch.allclose(middle, bias.expand_as(middle), atol=1e-6)
        assert torch.isfinite(model(x)).all()


# ---------------------------------------------------------------- half precision


def _half_checkpoint(path, dtype: torch.dtype) -> None:
    tensors = load_file(str(digits.bundled_checkpoint_path()))
    with safe_open(str(digits.bundled_checkpoint_path()), "pt") as f:
        metadata = f.metadata()
    half = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(half, str(path), metadata=metadata)


@pytest.mark.parametrize("calibrated", [False, True], ids=["data-free", "calibrated"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_checkpoints_compress_and_load_in_their_dtype(tmp_path, run_cli, dtype, calibrated):
    source = tmp_path / "half.safetensors"
    _half_checkpoint(source, dtype)
    output = tmp_path / "half.lrc.safetensors"
    # Block reconstruction trains in float32 models only: off, so that both runs do the same steps.
    extra = (["--calib", "gaussian", "--calib-samples", "32", "--refine-steps", "10", "--block-steps", "0"]
             if calibrated else [])
    result = run_cli("compress", source, "--rank", "8", "-q", "-o", output, *extra)
    assert result.code == 0, result.err
    with safe_open(str(output), "pt") as f:
        stored = {f.get_slice(k).get_dtype() for k in f.keys() if not k.endswith("num_batches_tracked")}  # noqa: SIM118
        manifest = json.loads(f.metadata()[MANIFEST_KEY])
    assert stored == {"F16" if dtype == torch.float16 else "BF16"} and manifest["dtype"] == str(dtype)[6:]
    model = load(output)
    assert {p.dtype for p in model.parameters()} == {dtype}
    assert sum(isinstance(m, LOW_RANK_TYPES) for m in model.modules()) == 8
    assert finite_model(model)
    # The same compression of the float32 checkpoint: half precision changes the result by rounding only.
    full = tmp_path / "full.lrc.safetensors"
    assert run_cli("compress", digits.bundled_checkpoint_path(), "--rank", "8", "-q", "-o", full, *extra).code == 0
    x = load_file(str(digits.bundled_test_split_path()))["x_test"][:64]
    with torch.no_grad():
        output_half = model(x.to(dtype))
        output_full = load(full)(x)
    assert output_half.dtype == dtype and torch.isfinite(output_half).all()
    if not calibrated:  # closed form: the factors differ by the checkpoint's rounding
        assert relative_error(output_full, output_half.float()) < (0.01 if dtype == torch.float16 else 0.06)
    else:
        # Refinement is a non-convex descent: rounding moves it to a nearby, equally good optimum.
        # The half compression must be as faithful to the original as the float32 one.
        original = digits.DigitsCNN()
        original.load_state_dict(load_file(str(digits.bundled_checkpoint_path())))
        with torch.no_grad():
            reference = original.eval()(x)
        error_full = relative_error(reference, output_full)
        error_half = relative_error(reference, output_half.float())
        assert error_half <= 1.05 * error_full + 0.01, (error_half, error_full)
        assert relative_error(output_full, output_half.float()) < (0.05 if dtype == torch.float16 else 0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_models_evaluate_export_and_bench_like_float32_ones(tmp_path, run_cli, dtype):
    # eval fed float32 images to a half model, and bench on onnxruntime exported it in half precision.
    test = load_file(str(digits.bundled_test_split_path()))
    digits.write_image_folder(tmp_path / "data", test["x_test"][:60], test["y_test"][:60], "val")
    _half_checkpoint(tmp_path / "half.safetensors", dtype)
    accuracy = {}
    for name, path in (("half", tmp_path / "half.safetensors"), ("full", digits.bundled_checkpoint_path())):
        result = run_cli("eval", path, "--data", tmp_path / "data", "--workers", "0", "--device", "cpu",
                         "--json", tmp_path / f"{name}.json")
        assert result.code == 0, result.err
        accuracy[name] = json.loads((tmp_path / f"{name}.json").read_text())["top1"]
    assert accuracy["full"] > 0.9 and abs(accuracy["half"] - accuracy["full"]) <= 2 / 60
    result = run_cli("export", tmp_path / "half.safetensors", "--onnx", tmp_path / "half.onnx",
                     "--json", tmp_path / "p.json")
    assert result.code == 0, result.err
    assert json.loads((tmp_path / "p.json").read_text())["passed"]
    result = run_cli("bench", tmp_path / "half.safetensors", "--vs", tmp_path / "half.onnx", "--runtime", "onnxruntime",
                     "--repeats", "1", "--warmup", "0", "--batch-sizes", "1", "--json", tmp_path / "b.json")
    assert result.code == 0, result.err
    latencies = [r["median_s"] for r in json.loads((tmp_path / "b.json").read_text())["results"]]
    assert len(latencies) == 2 and all(t > 0 for t in latencies)


# ---------------------------------------------------------------- tied modules


@pytest.mark.parametrize("method", METHODS)
def test_tied_modules_are_calibrated_once_and_stay_tied_after_load(tmp_path, run_cli, method):
    # The data-free case is in test_cli_compress.py; calibration sees the shared layer called twice.
    torch.manual_seed(0)
    torch.save(TiedNet().eval().state_dict(), tmp_path / "tied.pt")
    result = run_cli("compress", tmp_path / "tied.pt", "--arch", "models:TiedNet", "--input-shape", "2,24",
                     "--rank", "8", "--method", method, "--calib", "gaussian", "--calib-samples", "64",
                     "--refine-steps", "10", "-q", "-o", tmp_path / "tied.lrc.safetensors",
                     "--json", tmp_path / "r.json")
    assert result.code == 0, result.err
    report = json.loads((tmp_path / "r.json").read_text())
    assert [layer["name"] for layer in report["layers"]].count("shared") == 1
    assert "alias" not in {layer["name"] for layer in report["layers"]}
    assert {s["name"] for s in report["skipped"]} >= {"c", "d"}  # weight-tied layers stay dense
    loaded = load(tmp_path / "tied.lrc.safetensors")
    assert isinstance(loaded.shared, LOW_RANK_TYPES) and loaded.shared is loaded.alias
    assert loaded.c.weight is loaded.d.weight
    with safe_open(str(tmp_path / "tied.lrc.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert len(keys & {"shared.up.weight", "alias.up.weight"}) == 1  # the factors are stored once
    assert finite_model(loaded) and torch.isfinite(loaded(torch.randn(5, 24))).all()


# ---------------------------------------------------------------- very large layers


def test_row_blocked_float64_math_matches_whole_matrix_math(monkeypatch):
    # Large weights are never copied whole to float64: the same quantities are computed by row blocks.
    torch.manual_seed(0)
    w = torch.randn(300, 200) / 15
    b = 0.1 * torch.randn(300, dtype=torch.float64)
    whole = projection.factorize_all(w, 12, "gelu", b)
    whole_errors = {k: gaussian.function_error(w, b, f, "gelu", relative=True) for k, f in whole.items()}
    for module in (factors, projection):
        monkeypatch.setattr(module, "LARGE_WEIGHT", 1000)
    monkeypatch.setattr(factors, "BLOCK_ELEMENTS", 4000)  # blocks of 20 rows
    blocked = projection.factorize_all(w, 12, "gelu", b)
    blocked_errors = {k: gaussian.function_error(w, b, f, "gelu", relative=True) for k, f in blocked.items()}
    for method in projection.METHODS:
        assert torch.allclose(blocked[method].A, whole[method].A, rtol=1e-5, atol=1e-7)
        assert torch.allclose(blocked[method].B, whole[method].B, rtol=1e-5, atol=1e-7)
        assert torch.allclose(blocked[method].bias, whole[method].bias, rtol=1e-5, atol=1e-7)
        assert blocked_errors[method] == pytest.approx(whole_errors[method], rel=1e-9)
        assert 0.0 < blocked_errors[method] < 1.0


def test_the_effective_weight_of_a_large_layer_keeps_its_dtype(monkeypatch):
    from lowrank_compress import graph

    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU()).eval()
    site = find_sites(model, torch.randn(1, 64))[0]
    assert site.effective_weight()[0].dtype == torch.float64
    monkeypatch.setattr(graph, "LARGE_WEIGHT", 100)
    weight, _ = site.effective_weight()
    assert weight.dtype == torch.float32 and weight.data_ptr() == model[0].weight.data_ptr()  # a view, no copy


LARGE_LAYER_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from torch import nn
    from lowrank_compress.compress import CompressConfig, compress
    from lowrank_compress.factors import LARGE_WEIGHT
    torch.set_num_threads(1)
    m, d, rank = 1024, 49152, 8
    assert m * d >= LARGE_WEIGHT
    warm = nn.Sequential(nn.Linear(64, 64), nn.ReLU()).eval()  # one-time imports and caches first
    compress(warm, CompressConfig(rank=4), torch.randn(1, 64))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, m), nn.ReLU()).eval()
    x = torch.randn(4, d)
    with torch.no_grad():
        reference = model(x)
    def peak_bytes():  # VmHWM: this process's own peak (ru_maxrss starts at the parent's after fork + exec)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    before = peak_bytes()
    model, report = compress(model, CompressConfig(rank=rank), x[:1])
    peak = peak_bytes()
    with torch.no_grad():
        output = model(x)
    print(json.dumps({
        "extra": peak - before, "weight": m * d * 4, "rank": report.layers[0].rank,
        "finite": all(bool(torch.isfinite(p).all()) for p in model.parameters()) and bool(torch.isfinite(output).all()),
        "error": float((output - reference).norm() / reference.norm()),
    }))
""")


def test_a_large_layer_is_compressed_without_a_float64_copy_of_its_weight():
    # Scaled down from the 16384² benchmark (benchmarks/big_layer.py): a 1024×49152 Linear (192 MiB
    # in float32, at LARGE_WEIGHT) at rank 8. A float64 copy alone would add 384 MiB; before row
    # blocking the peak rose by ~1.2 GiB. A fixed mmap threshold makes the peak RSS count live
    # memory rather than what glibc keeps after free.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    done = subprocess.run([sys.executable, "-c", LARGE_LAYER_SCRIPT], check=False, capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rank"] == 8 and result["finite"]
    assert result["extra"] < result["weight"], result  # less than the weight itself in float32
    assert 0.0 < result["error"] < 1.0
