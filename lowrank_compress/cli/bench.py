"""``lrc bench``: params, FLOPs and latency, against a baseline."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, out
from .options import ARCH_HELP


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
    from ..benchjob import BenchJob, run_bench
    from ..errors import BudgetExceeded
    from ..io.files import check_distinct_paths, write_json
    from .render import bench_tables

    check_distinct_paths({"MODEL": model, "--vs": vs}, {"--json": json_path})
    job = BenchJob(
        model, vs, arch, arch_kwargs, trust_pickle, input_shape, runtime, device, threads, batch_sizes, warmup,
        repeats, json_path, max_latency_ratio, throughput, compile, bf16, training, steps,
    )
    result = run_bench(job)
    for table in bench_tables(result):
        out.print(table)
    if json_path is not None:
        write_json(result.to_dict(), json_path)
    if not result.passed:
        worst = result.worst
        raise BudgetExceeded(
            f"latency ratio {worst[0]:.2f} > budget {max_latency_ratio:.2f} (batch {worst[1]}, {runtime} on {job.device})"
        )
