"""Size and speed of models: parameters, FLOPs and latency measured side by side.

Latency is measured in one process with the models' runs interleaved (A B A B …, the order
rotating every round), so slow drifts of a noisy machine (frequency scaling, other tenants, cache
state) hit every model alike and the *ratio* stays fair even when the absolute times move. The
figure reported is the median over the timed runs. On CUDA each run is timed with CUDA events.

Throughput, the way a GPU deployment or training run sees it, is in :mod:`lowrank_compress.throughput`.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import UsageError
from .export import DEFAULT_OPSET, ort_session, reference_forward, write_graph
from .modelrun import count_flops, model_device, model_dtype

RUNTIMES = ("torch", "onnxruntime")
ModelLike = nn.Module | str | os.PathLike


def count_onnx_params(path: str | os.PathLike) -> int:
    """Number of elements of an ONNX file's initializers (its weights and constants)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(int(np.prod(t.dims)) for t in graph.initializer)


def flops_at_shape(model: nn.Module, input_shape: Sequence[int]) -> int:
    """FLOPs of one forward pass in eval mode at ``input_shape`` (batch included), as
    :func:`modelrun.count_flops` counts them; a shape the model cannot take is a UsageError.
    """
    example = torch.zeros(tuple(input_shape), device=model_device(model), dtype=model_dtype(model))
    was_training = model.training
    model.eval()
    try:
        return count_flops(model, example, forward=reference_forward)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------- timing


@dataclass
class LatencyResult:
    """Median wall time of one model at one batch size; ``ratio`` is median / baseline's median."""

    model: str
    batch_size: int
    median_s: float
    iqr_s: float
    runs: int
    ratio: float | None = None


@dataclass
class LatencyReport:
    """Latencies of several models measured together (see the module docstring)."""

    runtime: str
    device: str
    threads: int | None
    input_shape: list[int]
    baseline: str
    results: list[LatencyResult] = field(default_factory=list)

    def ratio(self, model: str, batch_size: int) -> float | None:
        return next((r.ratio for r in self.results if r.model == model and r.batch_size == batch_size), None)

    def worst_ratio(self, model: str) -> tuple[float, int] | None:
        """(largest ratio against the baseline, the batch size where it occurs) for ``model``."""
        rows = [(r.ratio, r.batch_size) for r in self.results if r.model == model and r.ratio is not None]
        return max(rows) if rows else None

    def to_dict(self) -> dict:
        return asdict(self)


def runtime_fingerprint(runtime: str, device: str) -> str:
    """What a layer's measured time depends on besides the layer: runtime and its version, the
    processor (model name) or GPU, and the thread counts. Timings measured under another fingerprint
    are not reused (:class:`lowrank_compress.latencyplan.TimingCache`)."""
    parts = [runtime, device, f"torch {torch.__version__}"]
    if runtime == "onnxruntime":
        import onnxruntime

        parts.append(f"onnxruntime {onnxruntime.__version__}")
    if device == "cuda" and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name())
    else:
        parts.append(_cpu_model())
    parts.append(f"{os.cpu_count()} cpus, {torch.get_num_threads()} torch threads")
    if runtime == "onnxruntime":
        parts.append("intra-op spinning stopped after each run")  # how sessions are timed (see time_interleaved)
    return ", ".join(parts)


def _cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads in PyTorch (None: leave as is)."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_interleaved(
    runners: Mapping[str, Callable[[], object]], warmup: int, repeats: int, cuda: bool = False
) -> dict[str, list[float]]:
    """Seconds per call of each runner over ``repeats`` rounds; each round calls every runner once.

    Round k starts with runner k mod n, so no runner always follows the same one. ``warmup`` rounds
    are run first and not timed. With ``cuda`` each call is timed with CUDA events.

    onnxruntime sessions to be timed this way are opened with ``spin_between_runs=False``: each
    session has its own intra-op threads, which by default spin for a while after a run, and on a
    machine with few cores the spinning threads of the session that just ran take the cores from
    the next one (on 2 cores, resnet50 at batch 1 went from about 42 ms run alone to 79–89 ms
    interleaved, the compressed model from about 22 to 55 ms, pulling their ratio toward 1). The
    threads still spin during a run, as a deployment's do: with spinning turned off altogether
    every operator waits for its threads to wake, which cost the compressed model, with more and
    smaller operators, more than the dense one (30 against 22 ms at batch 1; dense 49 against 42).
    """
    if repeats < 1 or warmup < 0:
        raise UsageError(f"repeats must be ≥ 1 and warmup ≥ 0, got {repeats} and {warmup}")
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    if cuda:
        torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in names}
    for k in range(repeats):
        for name in names[k % len(names):] + names[: k % len(names)]:
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                runners[name]()
                end.record()
                end.synchronize()
                times[name].append(start.elapsed_time(end) / 1000.0)
            else:
                t0 = time.perf_counter()
                runners[name]()
                times[name].append(time.perf_counter() - t0)
    return times


def _iqr(values: list[float]) -> float:
    q = np.percentile(values, [25, 75])
    return float(q[1] - q[0])


def _check_runtime(runtime: str, device: str) -> None:
    if runtime not in RUNTIMES:
        raise UsageError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    if device not in ("cpu", "cuda"):
        raise UsageError(f"unknown device {device!r}; use cpu or cuda")
    if runtime == "onnxruntime" and device == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            raise UsageError("onnxruntime has no CUDA execution provider here (install onnxruntime-gpu)")
    elif device == "cuda" and not torch.cuda.is_available():
        raise UsageError("CUDA was asked for but is not available")


def _is_onnx(model: ModelLike) -> bool:
    return not isinstance(model, nn.Module)


def _torch_runner(model: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    def run() -> object:
        with torch.inference_mode():
            return model(x)

    return run


def _ort_runner(session, x: np.ndarray) -> Callable[[], object]:
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})


def measure_latency(
    models: Mapping[str, ModelLike],
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 32),
    runtime: str = "torch",
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 10,
    baseline: str | None = None,
    device: str = "cpu",
    opset: int = DEFAULT_OPSET,
) -> LatencyReport:
    """Median latency of each model at each batch size, interleaved, with ratios against ``baseline``.

    ``models`` maps names to ``nn.Module``s or ONNX file paths (onnxruntime only); modules are put
    in eval mode (and, on the torch runtime, moved to ``device``); modules timed on onnxruntime are
    exported to a temporary file first. ``input_shape`` (N, …): N is replaced by each batch size.
    ``baseline`` defaults to the first model. ``threads`` is the intra-op thread count of the
    runtime (None: its default). Returns medians in seconds per forward pass.
    """
    _check_runtime(runtime, device)
    if not models:
        raise UsageError("nothing to time")
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise UsageError(f"batch sizes must be positive integers, got {list(batch_sizes)}")
    baseline = baseline if baseline is not None else next(iter(models))
    if baseline not in models:
        raise UsageError(f"baseline {baseline!r} is not among the models")
    shape = tuple(int(s) for s in input_shape)
    report = LatencyReport(runtime, device, threads, list(shape), baseline)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch_threads(threads))
        prepared: dict[str, object] = {}
        tmpdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lrc-bench-")))
        for name, model in models.items():
            if runtime == "torch":
                if _is_onnx(model):
                    raise UsageError(f"{name} is an ONNX file; time it with --runtime onnxruntime")
                module = model.to(device).eval()
                reference_forward(module, torch.zeros((1, *shape[1:]), device=device, dtype=model_dtype(module)))
                prepared[name] = module
            else:
                path = model
                if not _is_onnx(model):
                    path = tmpdir / f"{len(prepared)}.onnx"
                    module = model.eval()
                    if model_dtype(module) != torch.float32 or model_device(module).type != "cpu":
                        # onnxruntime's CPU kernels take float32 inputs (as lrc export writes models)
                        module = copy.deepcopy(module).float().cpu()
                    example = torch.zeros((1, *shape[1:]))
                    reference_forward(module, example)
                    write_graph(module, path, example, opset=opset, dynamic_batch=True)
                session = ort_session(path, threads, device=device, spin_between_runs=False)
                rank = len(session.get_inputs()[0].shape)
                if rank != len(shape):
                    raise UsageError(f"input shape {shape} has {len(shape)} axes; {name} takes {rank}")
                prepared[name] = session
        for batch in batch_sizes:
            runners: dict[str, Callable[[], object]] = {}
            x = torch.randn((batch, *shape[1:]), generator=torch.Generator().manual_seed(batch))
            for name, item in prepared.items():
                if runtime == "torch":
                    runners[name] = _torch_runner(item, x.to(device=device, dtype=model_dtype(item)))
                else:
                    runners[name] = _ort_runner(item, x.numpy())
            times = time_interleaved(runners, warmup, repeats, cuda=device == "cuda")
            base = statistics.median(times[baseline])
            for name, values in times.items():
                median = statistics.median(values)
                report.results.append(
                    LatencyResult(name, batch, median, _iqr(values), len(values), median / base if base > 0 else None)
                )
    return report


def layer_latencies(
    layers: Mapping[str, nn.Module],
    input: torch.Tensor,
    runtime: str = "torch",
    device: str = "cpu",
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 15,
) -> dict[str, float]:
    """Seconds per call of each of several versions of one layer on ``input``: the fastest of
    ``repeats`` interleaved runs (a layer's run is short enough that the fastest is the one no other
    job interrupted; medians of millisecond runs on a shared machine vary several-fold).

    ``input`` is the layer's real input at the batch size that matters (batch included). On
    onnxruntime each layer is exported alone with the input's static shape, so every figure includes
    the layout reorders onnxruntime puts around a lone Conv (NCHW ↔ its blocked NCHWc layout);
    inside a whole graph those are absent. They add the same time to every version, so the
    *differences* are what a version saves in the graph, while ratios understate the gain. On the
    torch runtime with ``device`` cuda the layers run in bfloat16 (channels_last for 4-D inputs),
    as :func:`gpu_throughput` runs whole models. Layers are not changed (copies are timed).
    """
    _check_runtime(runtime, device)
    cuda = device == "cuda"
    with torch_threads(threads), contextlib.ExitStack() as stack:
        runners = {}
        if runtime == "torch":
            x = input.detach().to(device)
            if cuda:
                x = x.to(torch.bfloat16)
                if x.dim() == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
            for name, layer in layers.items():
                ready = copy.deepcopy(layer).eval().to(device=device, dtype=x.dtype)
                if cuda and x.dim() == 4:
                    ready = ready.to(memory_format=torch.channels_last)
                runners[name] = _torch_runner(ready, x)
        else:
            tmpdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lrc-layer-")))
            x = input.detach().float().cpu()
            for i, (name, layer) in enumerate(layers.items()):
                path = tmpdir / f"{i}.onnx"
                on_cpu = copy.deepcopy(layer).eval().float().cpu()
                write_graph(on_cpu, path, x, dynamic_batch=False)
                session = ort_session(path, threads, device=device, spin_between_runs=False)
                runners[name] = _ort_runner(session, x.numpy())
        times = time_interleaved(runners, warmup, repeats, cuda=cuda)
    return {name: min(values) for name, values in times.items()}


def layer_latency(
    dense_layer: nn.Module,
    factorized_layer: nn.Module,
    input: torch.Tensor,
    runtime: str = "torch",
    threads: int | None = None,
    warmup: int = 3,
    repeats: int = 15,
) -> tuple[float, float]:
    """(dense, factorized) seconds per call of two versions of one layer on ``input``
    (see :func:`layer_latencies`; the device is the input's)."""
    times = layer_latencies({"dense": dense_layer, "factorized": factorized_layer}, input, runtime,
                            input.device.type, threads, warmup, repeats)
    return times["dense"], times["factorized"]
