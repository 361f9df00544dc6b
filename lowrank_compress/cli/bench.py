"""``lrc bench``: params, FLOPs and latency, against a baseline."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UsageError
from .app import app, out
from .options import ARCH_HELP, require_input_shape


def _parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise UsageError(f"bad --batch-sizes {text!r}: use comma-separated integers such as 1,32") from None
    if not sizes or any(s < 1 for s in sizes):
        raise UsageError(f"bad --batch-sizes {text!r}: every batch size must be a positive integer")
    return sizes


def _bench_subject(path: Path, arch: str | None, kwargs: dict, trust_pickle: bool, shape: tuple[int, ...] | None):
    """(model or ONNX path, its recorded input shape) for one file given to ``lrc bench``."""
    from ..io.opening import open_model
    from ..export import onnx_input_shape

    if path.suffix == ".onnx":
        if not path.is_file():
            raise UsageError(f"no such file: {path}")
        return path, onnx_input_shape(path)
    loaded = open_model(path, arch, kwargs, trust_pickle, shape)
    return loaded.model, loaded.input_shape


@app.command("bench")
def bench_command(
    model: Path = typer.Argument(..., help="A compressed .lrc.safetensors, an original checkpoint with --arch, or an .onnx file."),
    vs: Path | None = typer.Option(None, "--vs", help="Baseline to compare with (same kinds of file as MODEL); ratios are MODEL / baseline."),
    arch: str | None = typer.Option(None, "--arch", help=ARCH_HELP + " Used for whichever file needs it."),
    arch_kwargs: str | None = typer.Option(None, "--arch-kwargs", help="JSON keyword arguments for --arch."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow checkpoints holding pickled models (runs code from the file)."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="N,C,H,W (or N,D); N is replaced by each batch size \\[default: the model's recorded shape]."),
    runtime: str = typer.Option("torch", "--runtime", help="torch or onnxruntime (CPU; modules are exported to a temporary ONNX file)."),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu (torch runtime; CUDA runs are timed with CUDA events)."),
    threads: int | None = typer.Option(None, "--threads", help="Intra-op threads of the runtime \\[default: the runtime's own]."),
    batch_sizes: str = typer.Option("1,32", "--batch-sizes", help="Comma-separated batch sizes to time."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed rounds before timing."),
    repeats: int = typer.Option(10, "--repeats", help="Timed rounds; each runs every model once, interleaved."),
    json_path: Path | None = typer.Option(None, "--json", help="Write params, FLOPs, latencies and ratios here as JSON."),
    max_latency_ratio: float | None = typer.Option(None, "--max-latency-ratio", help="Exit 3 when MODEL's latency / the baseline's exceeds this at any batch size; the JSON is still written."),
    throughput: bool | None = typer.Option(None, "--throughput/--latency", help="Time throughput the GPU way (bf16 autocast, channels_last, torch.compile, synchronized blocks of steps; inference and training) instead of per-call latency \\[default: throughput on CUDA]."),
    compile: bool = typer.Option(True, "--compile/--no-compile", help="Throughput: torch.compile every model (both, so neither is favoured)."),
    bf16: bool | None = typer.Option(None, "--bf16/--fp32", help="Throughput: bf16 autocast \\[default: on CUDA]."),
    training: bool = typer.Option(True, "--training/--no-training", help="Throughput: also time training steps (SGD, backward included)."),
    steps: int = typer.Option(20, "--steps", help="Throughput: steps per timed round (--repeats rounds, --warmup steps first)."),
) -> None:
    """Params, FLOPs and median latency (interleaved runs in one process), with ratios against --vs."""
    import torch
    from rich.table import Table

    from ..bench import RUNTIMES, count_flops, count_onnx_params, count_params, measure_latency, measure_throughput
    from ..io.checks import parse_arch_kwargs, parse_input_shape
    from ..errors import BudgetExceeded
    from ..io.files import check_distinct_paths, check_writable, write_json

    check_distinct_paths({"MODEL": model, "--vs": vs}, {"--json": json_path})
    shape = parse_input_shape(input_shape)
    sizes = _parse_batch_sizes(batch_sizes)
    if runtime not in RUNTIMES:
        raise UsageError(f"--runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {device!r}")
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be ≥ 1, got {threads}")
    if repeats < 1 or warmup < 0:
        raise UsageError(f"--repeats must be ≥ 1 and --warmup ≥ 0, got {repeats} and {warmup}")
    if max_latency_ratio is not None:
        if vs is None:
            raise UsageError("--max-latency-ratio needs a baseline: pass --vs BASELINE")
        if not max_latency_ratio > 0:
            raise UsageError(f"--max-latency-ratio must be positive, got {max_latency_ratio}")
    if json_path is not None:
        check_writable(json_path)
    if device == "auto":
        device = "cuda" if runtime == "torch" and torch.cuda.is_available() else "cpu"
    kwargs = parse_arch_kwargs(arch_kwargs)
    subjects: dict[str, tuple] = {}
    if vs is not None:
        subjects["baseline"] = (vs, *_bench_subject(vs, arch, kwargs, trust_pickle, shape))
    subjects["model"] = (model, *_bench_subject(model, arch, kwargs, trust_pickle, shape))
    shape = shape or subjects["model"][2] or (subjects["baseline"][2] if vs is not None else None)
    shape = require_input_shape(None, shape, model)

    sizes_info: dict[str, dict] = {}
    for name, (path, item, _) in subjects.items():
        if isinstance(item, torch.nn.Module):
            info = {"path": str(path), "params": count_params(item), "flops": count_flops(item, (1, *shape[1:]))}
        else:
            info = {"path": str(path), "params": count_onnx_params(item), "flops": None}
        sizes_info[name] = info
    if throughput is None:
        throughput = device == "cuda" and runtime == "torch"
    if throughput and (runtime != "torch" or any(not isinstance(s[1], torch.nn.Module) for s in subjects.values())):
        raise UsageError("--throughput times PyTorch models: use --runtime torch and model files, not .onnx")
    if throughput:
        report = measure_throughput(
            {name: s[1] for name, s in subjects.items()}, shape, sizes, device=device,
            modes=("inference", "training") if training else ("inference",), bf16=bf16, compile=compile,
            warmup=warmup, steps=steps, rounds=repeats,
        )
    else:
        report = measure_latency(
            {name: s[1] for name, s in subjects.items()}, shape, sizes, runtime=runtime, threads=threads,
            warmup=warmup, repeats=repeats, device=device,
        )

    base = sizes_info.get("baseline")
    table = Table(title=f"size (FLOPs per sample at {'×'.join(map(str, shape[1:]))})")
    for column in ("", "file", "params", "GFLOPs", "params ratio", "FLOPs ratio"):
        table.add_column(column, justify="right" if column not in ("", "file") else "left")
    for name, info in sizes_info.items():
        p_ratio = f"{info['params'] / base['params']:.3f}" if base else ""
        f_ratio = f"{info['flops'] / base['flops']:.3f}" if base and info["flops"] and base["flops"] else ""
        gflops = f"{info['flops'] / 1e9:.3f}" if info["flops"] is not None else "–"
        table.add_row(name, info["path"], f"{info['params']:,}", gflops, p_ratio, f_ratio)
    out.print(table)
    if throughput:
        how = ", ".join(w for w, on in (("bf16 autocast", report.bf16), ("channels_last", report.channels_last),
                                         ("torch.compile", report.compiled)) if on) or "eager float32"
        table = Table(title=f"throughput on {device} ({how}), median of {repeats} rounds of {steps} steps")
        for column in ("", "mode", "batch", "samples/s", "step ms", "ratio"):
            table.add_column(column, justify="right" if column not in ("", "mode") else "left")
        for r in sorted(report.results, key=lambda r: (r.mode, r.batch_size, r.model != "baseline")):
            ratio = f"{r.ratio:.3f}" if vs is not None and r.ratio is not None else ""
            table.add_row(r.model, r.mode, str(r.batch_size), f"{r.samples_per_s:,.1f}", f"{r.step_s * 1e3:.2f}", ratio)
        out.print(table)
        # Latency of an inference step relative to the baseline's: the inverse of the throughput ratio.
        rows = [(1 / r.ratio, r.batch_size) for r in report.results
                if r.model == "model" and r.mode == "inference" and r.ratio]
        worst = max(rows) if rows and vs is not None else None
    else:
        threads_text = "default threads" if threads is None else f"{threads} thread{'' if threads == 1 else 's'}"
        table = Table(title=f"latency: {runtime} on {device}, {threads_text}, median of {repeats} interleaved runs")
        for column in ("", "batch", "median ms", "IQR ms", "ratio"):
            table.add_column(column, justify="right" if column else "left")
        for r in sorted(report.results, key=lambda r: (r.batch_size, r.model != "baseline")):
            ratio = f"{r.ratio:.3f}" if vs is not None and r.ratio is not None else ""
            table.add_row(r.model, str(r.batch_size), f"{r.median_s * 1e3:.2f}", f"{r.iqr_s * 1e3:.2f}", ratio)
        out.print(table)
        worst = report.worst_ratio("model") if vs is not None else None

    passed = worst is None or max_latency_ratio is None or worst[0] <= max_latency_ratio
    if json_path is not None:
        result = {
            **{k: v for k, v in report.to_dict().items() if k != "baseline"},
            "models": sizes_info,
            "timing": "throughput" if throughput else "latency",
            "max_latency_ratio": max_latency_ratio,
            "worst_latency_ratio": None if worst is None else worst[0],
            "worst_batch_size": None if worst is None else worst[1],
            "passed": passed,
        }
        write_json(result, json_path)
    if not passed:
        raise BudgetExceeded(
            f"latency ratio {worst[0]:.2f} > budget {max_latency_ratio:.2f} (batch {worst[1]}, {runtime} on {device})"
        )
