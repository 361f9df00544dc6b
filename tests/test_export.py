"""ONNX export with a parity check (lowrank_compress.export) and the ``lrc export`` command."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
import torchvision
from PIL import Image
from torch import nn

from lowrank_compress.layers import from_dense
from lowrank_compress.factors import Factorization
from lowrank_compress.errors import LrcError, UsageError
from lowrank_compress.export import export_onnx, verify_onnx
from lowrank_compress.layers import LOW_RANK_TYPES, unsupported_reason
from models import invoke_cli, one_error_line

# Every op a factorized torchvision/timm model may export to: all default-domain ONNX ops. The
# point is what is absent: ATen fallbacks, custom domains, BatchNormalization (folded into Conv).
STANDARD_OPS = {
    "Add", "AveragePool", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "Div", "Equal", "Erf", "Expand",
    "Flatten", "Gather", "GatherND", "Gemm", "GlobalAveragePool", "HardSigmoid", "HardSwish", "Identity",
    "LayerNormalization", "MatMul", "MaxPool", "Mul", "Pow", "ReduceMean", "Relu", "Reshape", "Shape", "Sigmoid",
    "Slice", "Softmax", "Split", "Sqrt", "Squeeze", "Sub", "Transpose", "Unsqueeze", "Where",
}



def factorize_every_layer(model: nn.Module, param_ratio: float = 0.25) -> nn.Module:
    """Swap every eligible Linear/Conv for a rank-r factorized layer, r = ⌊ratio·m·d/(m+d)⌋.

    Export only sees the structure (down/up layers), so the factors are random with the dense
    layer's scale (A B has entries of variance 1/d) rather than an SVD: a 4096×25088 SVD would
    cost more than the export under test.
    """
    gen = torch.Generator().manual_seed(0)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (nn.Linear, nn.Conv1d, nn.Conv2d)) or unsupported_reason(child) is not None:
                continue
            m, d = child.weight.shape[0], child.weight[0].numel()
            rank = int(param_ratio * m * d / (m + d))
            if rank >= 1:
                A = torch.randn(m, rank, generator=gen) / rank**0.5
                B = torch.randn(rank, d, generator=gen) / d**0.5
                setattr(parent, name, from_dense(child, Factorization(A, B, child.bias)))
    return model.eval()


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))


def timm_model(name: str, **kwargs) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


# (name, factory, input shape): the acceptance list, random init, small inputs.
MODELS: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("mlp", mlp, (1, 32)),
    ("torchvision_resnet18", lambda: torchvision.models.resnet18(num_classes=10), (1, 3, 64, 64)),
    ("torchvision_resnet50", lambda: torchvision.models.resnet50(num_classes=10), (1, 3, 64, 64)),
    ("torchvision_mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(num_classes=10), (1, 3, 64, 64)),
    ("timm_resnet50", lambda: timm_model("resnet50"), (1, 3, 64, 64)),
    ("timm_efficientnet_b0", lambda: timm_model("efficientnet_b0"), (1, 3, 64, 64)),
    ("timm_vit_tiny_patch16_224", lambda: timm_model("vit_tiny_patch16_224", img_size=64), (1, 3, 64, 64)),
    ("timm_convnext_atto", lambda: timm_model("convnext_atto"), (1, 3, 64, 64)),
]


def _check_parity(model: nn.Module, shape: tuple[int, ...], path: Path) -> None:
    report = export_onnx(model, path, shape)
    assert report.passed, f"max rel error {report.max_rel_error:.2e}"
    assert report.max_rel_error <= 1e-4
    assert report.input_names == ["input"] and report.output_names == ["output"]
    assert report.batch_sizes == [1, 3]
    assert set(report.op_types) <= STANDARD_OPS, set(report.op_types) - STANDARD_OPS
    assert report.nonstandard_ops == []


@pytest.mark.parametrize("name,factory,shape", MODELS, ids=[m[0] for m in MODELS])
def test_parity_holds_for_factorized_models(tmp_path: Path, name: str, factory, shape) -> None:
    torch.manual_seed(0)
    model = factorize_every_layer(factory())
    assert any(isinstance(m, LOW_RANK_TYPES) for m in model.modules())
    _check_parity(model, shape, tmp_path / f"{name}.onnx")


@pytest.mark.slow
def test_parity_holds_for_factorized_vgg11_bn(tmp_path: Path) -> None:
    # At 32×32 VGG's adaptive 7×7 pooling defeats the TorchScript exporter; auto falls back to dynamo.
    torch.manual_seed(0)
    model = factorize_every_layer(torchvision.models.vgg11_bn(num_classes=10))
    report = export_onnx(model, tmp_path / "vgg.onnx", (1, 3, 32, 32))
    assert report.passed and report.exporter == "dynamo"
    assert set(report.op_types) <= STANDARD_OPS and report.nonstandard_ops == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vgg.onnx"]


def test_parity_holds_after_compress(tmp_path: Path) -> None:
    from lowrank_compress.compress import CompressConfig, compress

    torch.manual_seed(0)
    example = torch.randn(1, 3, 64, 64)
    config = CompressConfig(method="spectral", param_ratio=0.25)
    model, report = compress(torchvision.models.resnet18(num_classes=10), config, example)
    assert report.layers
    _check_parity(model, (1, 3, 64, 64), tmp_path / "r18.onnx")


def test_factorized_cnn_graph_is_plain_conv_gemm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = factorize_every_layer(torchvision.models.resnet18(num_classes=10))
    factorized_convs = sum(isinstance(m, LOW_RANK_TYPES) and isinstance(m.down, nn.Conv2d) for m in model.modules())
    report = export_onnx(model, tmp_path / "r18.onnx", (1, 3, 32, 32))
    graph = onnx.load(str(tmp_path / "r18.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert set(ops) <= {"Conv", "Gemm", "MatMul", "Add", "Relu", "MaxPool", "GlobalAveragePool", "Flatten", "Identity"}
    # Each factorized conv is two Conv nodes (down, up) with BatchNorm folded in: nothing else convolves.
    assert ops.count("Conv") == 2 * factorized_convs
    assert report.exporter == "torchscript" and report.opset == 17


def test_batch_axis_is_dynamic(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = factorize_every_layer(mlp())
    export_onnx(model, tmp_path / "mlp.onnx", (1, 32))
    session = ort.InferenceSession(str(tmp_path / "mlp.onnx"), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)
    for batch in (1, 3, 7):
        x = torch.randn(batch, 32)
        (y,) = session.run(None, {"input": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(y, model(x).numpy(), rtol=1e-5, atol=1e-5)


def test_example_inputs_fix_the_traced_shape(tmp_path: Path) -> None:
    model = factorize_every_layer(mlp())
    report = export_onnx(model, tmp_path / "mlp.onnx", example_inputs=torch.randn(2, 32))
    assert report.passed and report.batch_sizes == [2, 4]


def test_calibration_inputs_are_compared(tmp_path: Path) -> None:
    model = factorize_every_layer(mlp())
    report = export_onnx(model, tmp_path / "mlp.onnx", (1, 32), calib_inputs=torch.randn(40, 32) * 5)
    assert report.passed and report.calib_samples == 40


def test_verify_reads_the_input_shape_from_the_file(tmp_path: Path) -> None:
    model = factorize_every_layer(mlp())
    export_onnx(model, tmp_path / "mlp.onnx", (1, 32))
    report = verify_onnx(tmp_path / "mlp.onnx", model)
    assert report.passed and report.batch_sizes == [1, 3] and report.exporter is None


def test_dynamo_exporter_on_request(tmp_path: Path) -> None:
    model = factorize_every_layer(mlp())
    report = export_onnx(model, tmp_path / "mlp.onnx", (1, 32), exporter="dynamo")
    assert report.passed and report.exporter == "dynamo" and report.opset >= 18


class _Mislabelled(torch.autograd.Function):
    """sin in PyTorch, cos in ONNX: an export that runs but computes something else."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(x)

    @staticmethod
    def symbolic(g, x):
        return g.op("Cos", x)


class _Drifting(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Mislabelled.apply(x)


def test_failed_parity_keeps_the_file_and_reports_it(tmp_path: Path) -> None:
    report = export_onnx(_Drifting(), tmp_path / "bad.onnx", (1, 8), exporter="torchscript")
    assert not report.passed and report.max_rel_error > 0.1
    assert (tmp_path / "bad.onnx").is_file()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_export_failure_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_export(model, args, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("tracer gave up")

    monkeypatch.setattr(torch.onnx, "export", broken_export)
    with pytest.raises(LrcError, match="ONNX export failed \\(tracer gave up\\)"):
        export_onnx(mlp(), tmp_path / "out.onnx", (1, 32))
    assert _leftovers(tmp_path) == []


def test_interrupt_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx.checker, "check_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(mlp(), tmp_path / "out.onnx", (1, 32))
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("shape", [(32,), (1, 32, 1), (1, 31)])
def test_wrong_input_shape_is_a_usage_error(tmp_path: Path, shape: tuple[int, ...]) -> None:
    with pytest.raises(UsageError, match="does not fit the model"):
        export_onnx(mlp(), tmp_path / "out.onnx", shape)
    assert _leftovers(tmp_path) == []


def test_unbatched_image_shape_is_a_usage_error(tmp_path: Path) -> None:
    # Conv2d accepts (C, H, W) as one unbatched image; the batch axis would then be the channels.
    model = torchvision.models.resnet18(num_classes=10)
    with pytest.raises(UsageError, match="leading batch axis"):
        export_onnx(model, tmp_path / "out.onnx", (3, 32, 32))
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------- lrc export


@pytest.fixture
def checkpoint(test_resnet_checkpoint: Path) -> Path:
    return test_resnet_checkpoint


ARCH = ["--arch", "timm:test_resnet", "--arch-kwargs", '{"num_classes": 10}']


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    result = invoke_cli(capsys, *args)
    return result.code, result.out, result.err


def test_cli_exports_and_reports_parity(tmp_path: Path, checkpoint: Path, capsys) -> None:
    out = tmp_path / "model.onnx"
    code, stdout, _ = run_cli(
        ["export", str(checkpoint), *ARCH, "--onnx", str(out), "--input-shape", "1,3,32,32",
         "--json", str(tmp_path / "p.json")],
        capsys,
    )
    assert code == 0 and out.is_file()
    assert "pass" in stdout and "max rel error" in stdout
    assert '"passed": true' in (tmp_path / "p.json").read_text()


def test_cli_compares_on_calibration_images(tmp_path: Path, checkpoint: Path, capsys) -> None:
    images = tmp_path / "calib"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(images / f"{i}.png")
    code, stdout, _ = run_cli(
        ["export", str(checkpoint), *ARCH, "--onnx", str(tmp_path / "m.onnx"), "--input-shape", "1,3,32,32",
         "--calib", str(images)],
        capsys,
    )
    assert code == 0 and "+ 5 calib" in stdout


def test_cli_compares_on_gaussian_calibration(tmp_path: Path, checkpoint: Path, capsys) -> None:
    code, stdout, _ = run_cli(
        ["export", str(checkpoint), *ARCH, "--onnx", str(tmp_path / "m.onnx"), "--input-shape", "1,3,32,32",
         "--calib", "gaussian", "--calib-samples", "20"],
        capsys,
    )
    assert code == 0 and "+ 20 calib" in stdout


def test_cli_parity_miss_exits_1_and_keeps_the_file(tmp_path: Path, checkpoint: Path, capsys) -> None:
    out = tmp_path / "model.onnx"
    code, _, err = run_cli(
        ["export", str(checkpoint), *ARCH, "--onnx", str(out), "--input-shape", "1,3,32,32", "--rtol", "1e-15"], capsys
    )
    assert code == 1
    assert "kept for inspection" in one_error_line(err)
    assert out.is_file()


def test_cli_non_model_file_is_one_line_and_no_file(tmp_path: Path, capsys) -> None:
    bogus = tmp_path / "notes.txt"
    bogus.write_text("not a checkpoint\n")
    out = tmp_path / "model.onnx"
    code, _, err = run_cli(["export", str(bogus), *ARCH, "--onnx", str(out), "--input-shape", "1,3,32,32"], capsys)
    assert code == 2
    one_error_line(err)
    assert not out.exists()


def test_cli_wrong_rank_input_shape_is_one_line_and_no_file(tmp_path: Path, checkpoint: Path, capsys) -> None:
    out = tmp_path / "model.onnx"
    code, _, err = run_cli(["export", str(checkpoint), *ARCH, "--onnx", str(out), "--input-shape", "1,3,32"], capsys)
    assert code == 2
    assert "does not fit the model" in one_error_line(err)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["missing_dir/model.onnx", "."])
def test_cli_unwritable_output_is_one_line(tmp_path: Path, checkpoint: Path, capsys, where: str) -> None:
    out = tmp_path / where
    code, _, err = run_cli(["export", str(checkpoint), *ARCH, "--onnx", str(out), "--input-shape", "1,3,32,32"], capsys)
    assert code == 2
    one_error_line(err)
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_cli_read_only_directory_is_one_line(tmp_path: Path, checkpoint: Path, capsys) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run_cli(
            ["export", str(checkpoint), *ARCH, "--onnx", str(locked / "m.onnx"), "--input-shape", "1,3,32,32"], capsys
        )
    finally:
        locked.chmod(0o700)
    assert code == 2 and "not writable" in one_error_line(err)


# ---------------------------------------------------------------- export for speed


def _op_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path)).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def _optimized_op_counts(path: Path) -> dict[str, int]:
    """Op counts of the graph as onnxruntime optimizes it for this CPU (fusions, NCHWc layout)."""
    from lowrank_compress.export import ort_session

    optimized = path.with_suffix(".opt.onnx")
    ort_session(path, threads=1, optimized_path=optimized)
    return _op_counts(optimized)


def factorize_in_blocks(model: nn.Module, block: int = 16) -> nn.Module:
    """Every eligible conv at a rank of ``block`` channels (onnxruntime's NCHWc block with AVX-512; a
    multiple of AVX2's 8), as the onnxruntime-cpu target rounds them; Linears at a quarter of their
    weights. Random factors, as in :func:`factorize_every_layer`."""
    gen = torch.Generator().manual_seed(0)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, (nn.Linear, nn.Conv2d)) or unsupported_reason(child) is not None:
                continue
            m, d = child.weight.shape[0], child.weight[0].numel()
            rank = block if isinstance(child, nn.Conv2d) else max(1, int(0.25 * m * d / (m + d)))
            A, B = torch.randn(m, rank, generator=gen) / rank**0.5, torch.randn(rank, d, generator=gen) / d**0.5
            setattr(parent, name, from_dense(child, Factorization(A, B, child.bias)))
    return model.eval()


def _dense_and_factorized(tmp_path: Path, model: nn.Module, shape: tuple[int, ...]) -> tuple[Path, Path, int, int]:
    """Both exported; also the number of factorized convs and Linears."""
    dense_path, factorized_path = tmp_path / "dense.onnx", tmp_path / "factorized.onnx"
    assert export_onnx(model, dense_path, shape).passed
    factorized = factorize_in_blocks(model)
    assert export_onnx(factorized, factorized_path, shape).passed
    convs = sum(isinstance(m, LOW_RANK_TYPES) and hasattr(m, "kernel_size") for m in factorized.modules())
    linears = sum(isinstance(m, LOW_RANK_TYPES) and not hasattr(m, "kernel_size") for m in factorized.modules())
    return dense_path, factorized_path, convs, linears


def _randomized_resnet18() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.normal_(0, 0.2)
            bn.running_mean.normal_(0, 0.1)
            bn.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_batchnorm_after_a_factor_pair_is_folded_into_its_up_factor_and_nothing_is_added_around_it(tmp_path):
    dense, factorized, convs, linears = _dense_and_factorized(tmp_path, _randomized_resnet18(), (1, 3, 64, 64))
    before, after = _op_counts(dense), _op_counts(factorized)
    assert convs == 20 and linears == 1
    assert "BatchNormalization" not in before and "BatchNormalization" not in after
    assert after.pop("Conv") == before.pop("Conv") + convs
    # The factorized fc: its down factor is one MatMul (no bias) feeding the up factor's Gemm.
    assert after.pop("MatMul", 0) == before.pop("MatMul", 0) + linears
    assert after == before  # no Transpose, Reshape or anything else appears around the pairs


def test_onnxruntime_fuses_in_a_factorized_cnn_what_it_fused_in_the_dense_one(tmp_path):
    dense, factorized, convs, linears = _dense_and_factorized(tmp_path, _randomized_resnet18(), (1, 3, 64, 64))
    before, after = _optimized_op_counts(dense), _optimized_op_counts(factorized)
    # ReLU, the residual Add and BatchNorm are fused into the convolutions in both graphs.
    assert not {"Relu", "Add", "BatchNormalization"} & (set(before) | set(after))
    assert after.pop("Conv") == before.pop("Conv") + convs
    assert after.pop("MatMul", 0) == before.pop("MatMul", 0) + linears
    assert after == before  # the same layout reorders, pooling and head: nothing unfused, nothing added


def test_onnxruntime_fuses_in_a_factorized_vit_what_it_fused_in_the_dense_one(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2).eval()
    dense, factorized, convs, linears = _dense_and_factorized(tmp_path, model, (1, 3, 32, 32))
    before, after = _optimized_op_counts(dense), _optimized_op_counts(factorized)
    assert linears == 2 * 4 + 1 and convs == 1  # qkv, proj, fc1, fc2 per block, the head; the patch embedding
    assert after.pop("MatMul") == before.pop("MatMul") + linears  # each pair's down factor
    assert after.pop("Conv") == before.pop("Conv") + convs
    # GELU and bias adds fused as before; no Transpose or Reshape around the token-wise pairs.
    assert after == before


def test_a_profiled_session_records_a_kernel_time_for_every_node_run(tmp_path):
    # The profiler of benchmarks/speed.py --profile: the same session setup as the timed runs, with
    # onnxruntime's profiler on; each run of the graph adds one kernel-time event per node.
    import json

    from lowrank_compress.export import ort_session

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    path = tmp_path / "m.onnx"
    assert export_onnx(model, path, (1, 3, 8, 8)).passed
    session = ort_session(path, threads=1, profile_prefix=tmp_path / "prof")
    x = {session.get_inputs()[0].name: np.zeros((1, 3, 8, 8), dtype=np.float32)}
    for _ in range(3):
        session.run(None, x)
    profile = Path(session.end_profiling())
    assert profile.parent == tmp_path and profile.name.startswith("prof")
    kernels = [e for e in json.loads(profile.read_text())
               if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    nodes = {e["name"] for e in kernels}
    assert nodes and len(kernels) == 3 * len(nodes)
    assert any("Conv" in e["args"]["op_name"] for e in kernels)
