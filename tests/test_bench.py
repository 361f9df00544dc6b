"""Parameters, FLOPs and interleaved latency (lowrank_compress.bench) and the ``lrc bench`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lowrank_compress.layers import from_dense
from lowrank_compress.factors import Factorization
from lowrank_compress.bench import (
    count_onnx_params,
    flops_at_shape,
    layer_latencies,
    layer_latency,
    measure_latency,
    time_interleaved,
)
from lowrank_compress.modelrun import count_params
from lowrank_compress.throughput import measure_throughput
from lowrank_compress.errors import UsageError
from lowrank_compress.export import export_onnx
from models import invoke_cli, one_error_line



def low_rank(layer: nn.Module, rank: int) -> nn.Module:
    m, d = layer.weight.shape[0], layer.weight[0].numel()
    return from_dense(layer, Factorization(torch.randn(m, rank) / rank**0.5, torch.randn(rank, d) / d**0.5, layer.bias))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


# ---------------------------------------------------------------- counting


def test_shared_parameters_count_once() -> None:
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert count_params(model) == 8 * 8 + 8


def test_flops_are_two_per_multiply_add() -> None:
    dense = nn.Linear(100, 50)
    assert flops_at_shape(dense, (4, 100)) == 2 * 4 * 100 * 50
    assert flops_at_shape(low_rank(dense, 10), (4, 100)) == 2 * 4 * 10 * (100 + 50)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    assert flops_at_shape(conv, (1, 8, 10, 10)) == 2 * 10 * 10 * 16 * 8 * 9
    assert flops_at_shape(low_rank(conv, 4), (1, 8, 10, 10)) == 2 * 10 * 10 * 4 * (8 * 9 + 16)


def test_flops_of_a_wrong_shape_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="does not fit the model"):
        flops_at_shape(mlp(), (1, 33))


def test_onnx_params_are_the_initializers(tmp_path: Path) -> None:
    model = mlp()
    export_onnx(model, tmp_path / "m.onnx", (1, 32))
    assert count_onnx_params(tmp_path / "m.onnx") == count_params(model)


# ---------------------------------------------------------------- timing


def test_runs_are_interleaved_with_a_rotating_order() -> None:
    calls: list[str] = []
    runners = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = time_interleaved(runners, warmup=1, repeats=3)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_latency_has_a_median_and_ratio_per_model_and_batch() -> None:
    report = measure_latency({"base": mlp(), "small": mlp()}, (1, 32), batch_sizes=(1, 4), warmup=1, repeats=3)
    assert [(r.model, r.batch_size) for r in report.results] == [("base", 1), ("small", 1), ("base", 4), ("small", 4)]
    assert all(r.median_s > 0 and r.runs == 3 for r in report.results)
    assert report.ratio("base", 4) == 1.0
    assert report.worst_ratio("small")[1] in (1, 4)


def test_onnxruntime_times_modules_and_onnx_files_together(tmp_path: Path) -> None:
    model = mlp()
    export_onnx(model, tmp_path / "m.onnx", (1, 32))
    report = measure_latency(
        {"file": tmp_path / "m.onnx", "module": model}, (1, 32), batch_sizes=(2,), runtime="onnxruntime",
        threads=1, warmup=1, repeats=3,
    )
    assert report.baseline == "file" and len(report.results) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_onnxruntime_sessions_timed_together_stop_spinning_after_each_run(tmp_path: Path, monkeypatch) -> None:
    # Each session's intra-op threads spin on after a run by default, taking the cores from the next
    # session's run; every session opened for timing stops them when a run returns, and keeps
    # spinning during a run as a deployment does.
    from lowrank_compress import bench as bench_module
    from lowrank_compress.export import ort_session

    opened = []

    def recording(*args, **kwargs):
        session = ort_session(*args, **kwargs)
        options = session.get_session_options()
        opened.append(options.get_session_config_entry("session.force_spinning_stop"))
        with pytest.raises(RuntimeError, match="allow_spinning"):  # unset: spinning during a run stays on
            options.get_session_config_entry("session.intra_op.allow_spinning")
        return session

    monkeypatch.setattr(bench_module, "ort_session", recording)
    measure_latency({"a": mlp(), "b": mlp()}, (1, 32), batch_sizes=(2,), runtime="onnxruntime", warmup=1, repeats=2)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    layer_latency(conv, low_rank(conv, 2), torch.randn(1, 8, 8, 8), runtime="onnxruntime", repeats=2)
    assert opened == ["1"] * 4
    export_onnx(mlp(), tmp_path / "m.onnx", (1, 32))
    default = ort_session(tmp_path / "m.onnx").get_session_options()
    with pytest.raises(RuntimeError, match="force_spinning_stop"):  # unset: a deployment session is left as is
        default.get_session_config_entry("session.force_spinning_stop")


def test_onnx_file_on_torch_runtime_is_a_usage_error(tmp_path: Path) -> None:
    export_onnx(mlp(), tmp_path / "m.onnx", (1, 32))
    with pytest.raises(UsageError, match="--runtime onnxruntime"):
        measure_latency({"file": tmp_path / "m.onnx"}, (1, 32), runtime="torch")


def test_onnx_file_with_a_wrong_rank_shape_is_a_usage_error(tmp_path: Path) -> None:
    export_onnx(mlp(), tmp_path / "m.onnx", (1, 32))
    with pytest.raises(UsageError, match="axes"):
        measure_latency({"file": tmp_path / "m.onnx"}, (1, 3, 32), runtime="onnxruntime")


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_layer_latency_times_dense_and_factorized(runtime: str) -> None:
    conv = nn.Conv2d(32, 32, 3, padding=1)
    x = torch.randn(2, 32, 16, 16)
    dense_s, factorized_s = layer_latency(conv, low_rank(conv, 4), x, runtime=runtime, repeats=5)
    assert dense_s > 0 and factorized_s > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_latency_uses_events() -> None:
    report = measure_latency({"a": mlp(), "b": mlp()}, (1, 32), batch_sizes=(8,), device="cuda", warmup=2, repeats=5)
    assert report.device == "cuda" and all(r.median_s > 0 for r in report.results)


def test_layer_latencies_time_every_version_and_leave_the_layers_as_they_were() -> None:
    conv = nn.Conv2d(16, 16, 3, padding=1)
    before = conv.weight.clone()
    versions = {"dense": conv, "4": low_rank(conv, 4), "8": low_rank(conv, 8)}
    times = layer_latencies(versions, torch.randn(1, 16, 8, 8), runtime="onnxruntime", repeats=3)
    assert set(times) == {"dense", "4", "8"} and all(t > 0 for t in times.values())
    assert torch.equal(conv.weight, before)


def test_onnxruntime_on_cuda_without_its_provider_is_a_usage_error() -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is installed")
    with pytest.raises(UsageError, match="CUDA execution provider"):
        layer_latencies({"dense": nn.Linear(4, 4)}, torch.randn(1, 4), runtime="onnxruntime", device="cuda")


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4)).eval()


def test_throughput_reports_both_modes_at_every_batch_size_against_the_baseline() -> None:
    models = {"dense": conv_net(), "other": conv_net()}
    report = measure_throughput(models, (1, 3, 8, 8), batch_sizes=(2, 4), device="cpu", compile=False, warmup=1,
                                steps=2, rounds=2)
    assert [(r.mode, r.batch_size, r.model) for r in report.results] == [
        (mode, batch, name) for mode in ("inference", "training") for batch in (2, 4) for name in models]
    for r in report.results:
        assert r.samples_per_s == pytest.approx(r.batch_size / r.step_s) and r.rounds == 2
        if r.model == "dense":
            assert r.ratio == 1.0
    assert report.ratio("other", "training", 4) == next(
        r.ratio for r in report.results if (r.model, r.mode, r.batch_size) == ("other", "training", 4))
    # On CPU: no bf16 by default; channels_last for image inputs; nothing compiled when asked not to.
    assert (report.bf16, report.channels_last, report.compiled) == (False, True, False)


def test_throughput_trains_copies_and_leaves_the_models_as_they_were() -> None:
    model = conv_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    measure_throughput({"m": model}, (1, 3, 8, 8), batch_sizes=(2,), device="cpu", compile=False, modes=("training",),
                       warmup=1, steps=1, rounds=1)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model.training and next(model.parameters()).device.type == "cpu"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"modes": ("inference", "serving")}, "modes must be"),
    ({"batch_sizes": (0,)}, "batch sizes"),
    ({"steps": 0}, "steps and rounds"),
    ({"baseline": "nope"}, "baseline"),
    ({"device": "tpu"}, "unknown device"),
])
def test_bad_throughput_settings_are_usage_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        measure_throughput({"m": conv_net()}, (1, 3, 8, 8), **{"device": "cpu", "compile": False, **kwargs})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_throughput_runs_compiled_in_bf16() -> None:
    report = measure_throughput({"a": conv_net(), "b": conv_net()}, (1, 3, 32, 32), batch_sizes=(8,), warmup=2,
                                steps=2, rounds=2)
    assert report.bf16 and report.compiled and report.device == "cuda"
    assert all(r.samples_per_s > 0 for r in report.results)


# ---------------------------------------------------------------- lrc bench


@pytest.fixture
def checkpoint(test_resnet_checkpoint: Path) -> Path:
    return test_resnet_checkpoint


ARCH = ["--arch", "timm:test_resnet", "--arch-kwargs", '{"num_classes": 10}']
QUICK = ["--input-shape", "1,3,32,32", "--batch-sizes", "1,2", "--warmup", "1", "--repeats", "3", "--threads", "1"]


def run_cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    result = invoke_cli(capsys, *args)
    return result.code, result.out, result.err


def _gated_run(tmp_path: Path, checkpoint: Path, capsys, budget: str) -> tuple[int, str, str, dict]:
    """``lrc bench`` of a model against itself with --max-latency-ratio ``budget``: exit code, output, the JSON."""
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(["bench", str(checkpoint), "--vs", str(checkpoint), *ARCH, *QUICK, "--device", "cpu",
                                 "--json", str(out), "--max-latency-ratio", budget], capsys)
    return code, stdout, err, json.loads(out.read_text())


def test_gate_exits_3_when_the_ratio_misses_its_budget(tmp_path: Path, checkpoint: Path, capsys) -> None:
    # A model against itself has a ratio near 1, far above a 0.01 budget.
    code, _, err, result = _gated_run(tmp_path, checkpoint, capsys, "0.01")
    assert code == 3
    assert "> budget 0.01" in one_error_line(err)
    assert result["passed"] is False and result["worst_latency_ratio"] > 0.01


def test_gate_exits_0_when_the_ratio_meets_its_budget(tmp_path: Path, checkpoint: Path, capsys) -> None:
    code, stdout, _, result = _gated_run(tmp_path, checkpoint, capsys, "100")
    assert code == 0 and "median ms" in stdout
    assert result["passed"] is True and result["max_latency_ratio"] == 100
    assert result["models"]["model"]["flops"] == result["models"]["baseline"]["flops"] > 0
    assert {(r["model"], r["batch_size"]) for r in result["results"]} == {
        ("baseline", 1), ("model", 1), ("baseline", 2), ("model", 2)
    }


def test_bench_throughput_times_inference_and_training_against_the_baseline(tmp_path: Path, checkpoint: Path,
                                                                            capsys) -> None:
    out = tmp_path / "bench.json"
    code, stdout, _ = run_cli(
        ["bench", str(checkpoint), "--vs", str(checkpoint), *ARCH, "--input-shape", "1,3,32,32", "--batch-sizes", "2",
         "--device", "cpu", "--throughput", "--no-compile", "--warmup", "1", "--repeats", "2", "--steps", "1",
         "--json", str(out), "--max-latency-ratio", "100"],
        capsys,
    )
    assert code == 0 and "samples/s" in stdout
    result = json.loads(out.read_text())
    assert result["timing"] == "throughput" and result["compiled"] is False and result["bf16"] is False
    assert {(r["model"], r["mode"], r["batch_size"]) for r in result["results"]} == {
        (m, mode, 2) for m in ("baseline", "model") for mode in ("inference", "training")}
    assert all(r["ratio"] == 1.0 for r in result["results"] if r["model"] == "baseline")
    assert result["passed"] is True and result["worst_latency_ratio"] > 0


def test_bench_throughput_of_an_onnx_file_is_a_usage_error(tmp_path: Path, checkpoint: Path, capsys) -> None:
    path = tmp_path / "m.onnx"
    export_onnx(mlp(), path, (1, 32))
    code, _, stderr = run_cli(["bench", str(path), "--throughput", "--device", "cpu"], capsys)
    assert code == 2 and "--throughput times PyTorch models" in stderr


def test_bench_on_onnxruntime_against_an_onnx_baseline(tmp_path: Path, checkpoint: Path, capsys) -> None:
    export = ["export", str(checkpoint), *ARCH, "--onnx", str(tmp_path / "m.onnx"), "--input-shape", "1,3,32,32"]
    assert run_cli(export, capsys)[0] == 0
    code, stdout, _ = run_cli(
        ["bench", str(checkpoint), "--vs", str(tmp_path / "m.onnx"), *ARCH, *QUICK, "--runtime", "onnxruntime"], capsys
    )
    assert code == 0 and "onnxruntime on cpu" in stdout


def test_latency_budget_needs_a_baseline(checkpoint: Path, capsys) -> None:
    code, _, err = run_cli(["bench", str(checkpoint), *ARCH, *QUICK, "--max-latency-ratio", "0.5"], capsys)
    assert code == 2 and "--vs" in one_error_line(err)


def test_bench_wrong_rank_input_shape_is_one_line(checkpoint: Path, capsys) -> None:
    code, _, err = run_cli(["bench", str(checkpoint), *ARCH, "--input-shape", "1,3,32", "--device", "cpu"], capsys)
    assert code == 2 and "does not fit the model" in one_error_line(err)


def test_bench_non_model_file_is_one_line(tmp_path: Path, capsys) -> None:
    bogus = tmp_path / "weights.onnx"
    bogus.write_text("not onnx")
    code, _, err = run_cli(["bench", str(bogus), *QUICK, "--runtime", "onnxruntime"], capsys)
    assert code == 2 and "not a readable ONNX file" in one_error_line(err)


@pytest.mark.parametrize("flag,value", [("--batch-sizes", "1,x"), ("--runtime", "tvm"), ("--threads", "0")])
def test_bench_bad_options_are_usage_errors(checkpoint: Path, capsys, flag: str, value: str) -> None:
    code, _, err = run_cli(["bench", str(checkpoint), *ARCH, "--input-shape", "1,3,32,32", flag, value], capsys)
    assert code == 2
    one_error_line(err)


def test_bench_unwritable_json_fails_before_timing(tmp_path: Path, checkpoint: Path, capsys) -> None:
    code, _, err = run_cli(["bench", str(checkpoint), *ARCH, *QUICK, "--json", str(tmp_path / "no" / "b.json")], capsys)
    assert code == 2
    one_error_line(err)
