"""An ``lrc bench`` run as one checked record (which files, how to time them, the latency gate);
:func:`run_bench` opens the files, counts and times them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .bench import RUNTIMES, LatencyReport, count_onnx_params, flops_at_shape, measure_latency
from .errors import UsageError
from .io.checks import parse_arch_kwargs, parse_input_shape, require_input_shape
from .io.files import check_writable
from .modelrun import count_params
from .throughput import ThroughputReport, measure_throughput


def parse_batch_sizes(text: str) -> list[int]:
    """Comma-separated positive batch sizes, e.g. ``1,32``."""
    try:
        sizes = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise UsageError(f"bad --batch-sizes {text!r}: use comma-separated integers such as 1,32") from None
    if not sizes or any(s < 1 for s in sizes):
        raise UsageError(f"bad --batch-sizes {text!r}: every batch size must be a positive integer")
    return sizes


@dataclass
class BenchJob:
    """The options of ``lrc bench`` as given (shapes, sizes and kwargs as text); checked when built."""

    model: Path
    vs: Path | None = None
    arch: str | None = None
    arch_kwargs: str | None = None
    trust_pickle: bool = False
    input_shape: str | None = None
    runtime: str = "torch"
    device: str = "auto"
    threads: int | None = None
    batch_sizes: str = "1,32"
    warmup: int = 3
    repeats: int = 10
    json_path: Path | None = None
    max_latency_ratio: float | None = None
    throughput: bool | None = None
    compile: bool = True
    bf16: bool | None = None
    training: bool = True
    steps: int = 20

    def __post_init__(self) -> None:
        self.shape = parse_input_shape(self.input_shape)
        self.sizes = parse_batch_sizes(self.batch_sizes)
        if self.runtime not in RUNTIMES:
            raise UsageError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.threads is not None and self.threads < 1:
            raise UsageError(f"--threads must be ≥ 1, got {self.threads}")
        if self.repeats < 1 or self.warmup < 0:
            raise UsageError(f"--repeats must be ≥ 1 and --warmup ≥ 0, got {self.repeats} and {self.warmup}")
        if self.max_latency_ratio is not None:
            if self.vs is None:
                raise UsageError("--max-latency-ratio needs a baseline: pass --vs BASELINE")
            if not self.max_latency_ratio > 0:
                raise UsageError(f"--max-latency-ratio must be positive, got {self.max_latency_ratio}")
        if self.json_path is not None:
            check_writable(self.json_path)
        if self.device == "auto":
            import torch

            self.device = "cuda" if self.runtime == "torch" and torch.cuda.is_available() else "cpu"
        self.kwargs = parse_arch_kwargs(self.arch_kwargs)


@dataclass
class BenchResult:
    """What ``lrc bench`` measured: sizes per file, the timing report, and the latency gate."""

    job: BenchJob
    shape: tuple[int, ...]
    sizes: dict[str, dict]
    report: LatencyReport | ThroughputReport
    throughput: bool
    worst: tuple[float, int] | None

    @property
    def passed(self) -> bool:
        return self.worst is None or self.job.max_latency_ratio is None or self.worst[0] <= self.job.max_latency_ratio

    def to_dict(self) -> dict:
        """The ``--json`` record."""
        return {
            **{k: v for k, v in self.report.to_dict().items() if k != "baseline"},
            "models": self.sizes,
            "timing": "throughput" if self.throughput else "latency",
            "max_latency_ratio": self.job.max_latency_ratio,
            "worst_latency_ratio": None if self.worst is None else self.worst[0],
            "worst_batch_size": None if self.worst is None else self.worst[1],
            "passed": self.passed,
        }


def _bench_subject(job: BenchJob, path: Path):
    """(model or ONNX path, its recorded input shape) for one file given to ``lrc bench``."""
    from .export import onnx_input_shape
    from .io.opening import open_model

    if path.suffix == ".onnx":
        if not path.is_file():
            raise UsageError(f"no such file: {path}")
        return path, onnx_input_shape(path)
    loaded = open_model(path, job.arch, job.kwargs, job.trust_pickle, job.shape)
    return loaded.model, loaded.input_shape


def _worst_throughput_ratio(report: ThroughputReport) -> tuple[float, int] | None:
    """Latency of an inference step relative to the baseline's: the inverse of the throughput ratio."""
    rows = [(1 / r.ratio, r.batch_size) for r in report.results
            if r.model == "model" and r.mode == "inference" and r.ratio]
    return max(rows) if rows else None


def run_bench(job: BenchJob) -> BenchResult:
    """Open MODEL (and the baseline), count their parameters and FLOPs, and time them together."""
    import torch

    subjects: dict[str, tuple] = {}
    if job.vs is not None:
        subjects["baseline"] = (job.vs, *_bench_subject(job, job.vs))
    subjects["model"] = (job.model, *_bench_subject(job, job.model))
    shape = job.shape or subjects["model"][2] or (subjects["baseline"][2] if job.vs is not None else None)
    shape = require_input_shape(None, shape, job.model)
    sizes: dict[str, dict] = {}
    for name, (path, item, _) in subjects.items():
        if isinstance(item, torch.nn.Module):
            sizes[name] = {"path": str(path), "params": count_params(item), "flops": flops_at_shape(item, (1, *shape[1:]))}
        else:
            sizes[name] = {"path": str(path), "params": count_onnx_params(item), "flops": None}
    throughput = job.device == "cuda" and job.runtime == "torch" if job.throughput is None else job.throughput
    models = {name: s[1] for name, s in subjects.items()}
    if throughput and (job.runtime != "torch" or any(not isinstance(m, torch.nn.Module) for m in models.values())):
        raise UsageError("--throughput times PyTorch models: use --runtime torch and model files, not .onnx")
    if throughput:
        modes = ("inference", "training") if job.training else ("inference",)
        report = measure_throughput(models, shape, job.sizes, device=job.device, modes=modes, bf16=job.bf16,
                                    compile=job.compile, warmup=job.warmup, steps=job.steps, rounds=job.repeats)
        worst = _worst_throughput_ratio(report) if job.vs is not None else None
    else:
        report = measure_latency(models, shape, job.sizes, runtime=job.runtime, threads=job.threads,
                                 warmup=job.warmup, repeats=job.repeats, device=job.device)
        worst = report.worst_ratio("model") if job.vs is not None else None
    return BenchResult(job, shape, sizes, report, throughput, worst)
