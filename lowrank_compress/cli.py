"""The ``lrc`` command line: argument parsing and rendering only; the work is in the library."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Iterator

import click
import rich.markup
import typer
from rich.console import Console

from .errors import LrcError, UsageError

app = typer.Typer(
    name="lrc",
    help="Compress pretrained PyTorch models into low-rank layers that keep each layer's function.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()
if not out.is_terminal:
    out = Console(width=160)  # CI logs: wide enough that layer names are not cut

_DEBUG = {"on": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors.")) -> None:
    _DEBUG["on"] = debug


# --- compress / inspect commands ---

from pathlib import Path as _CPath  # noqa: E402


@app.command("inspect")
def inspect_command(
    checkpoint: _CPath = typer.Argument(..., help="A state dict (.safetensors/.pt/.pth/.bin) with --arch, or a .lrc.safetensors."),
    arch: str | None = typer.Option(None, "--arch", help="torchvision:NAME, timm:NAME or package.module:callable."),
    arch_kwargs: str | None = typer.Option(None, "--arch-kwargs", help="JSON keyword arguments for --arch."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="Example input shape to trace at, e.g. 1,3,224,224 \\[default: from the arch config]."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a checkpoint that holds a pickled model (runs code from the file)."),
    json_path: _CPath | None = typer.Option(None, "--json", help="Also write the table as JSON here."),
) -> None:
    """List every candidate layer: kind, shape, activation found, params, max useful rank, eligibility."""
    import json as _json

    from .checkpoint import open_model, parse_arch_kwargs, parse_input_shape, read_safetensors_metadata
    from .fileio import atomic_output, check_distinct_paths, check_writable
    from .serialization import MANIFEST_KEY, read_manifest
    from .tables import manifest_table, sites_table

    check_distinct_paths({"CHECKPOINT": checkpoint}, {"--json": json_path})
    if json_path is not None:
        check_writable(json_path)
    shape = parse_input_shape(input_shape)
    if checkpoint.suffix == ".safetensors" and MANIFEST_KEY in read_safetensors_metadata(checkpoint):
        manifest = read_manifest(checkpoint)
        title = f"{checkpoint.name}: {manifest.get('arch')}, method {manifest.get('method')}, input {manifest.get('input_shape')}"
        out.print(manifest_table(manifest, rich.markup.escape(title)))
        data: dict = {"manifest": manifest}
    else:
        import torch

        from .graph import find_sites

        loaded = open_model(checkpoint, arch, parse_arch_kwargs(arch_kwargs), trust_pickle, shape)
        if loaded.input_shape is None:
            raise UsageError(f"cannot tell the input shape of {checkpoint}; pass --input-shape, e.g. 1,3,224,224")
        dtype = next((p.dtype for p in loaded.model.parameters() if p.is_floating_point()), torch.float32)
        sites = find_sites(loaded.model, torch.randn(loaded.input_shape).to(dtype))
        out.print(sites_table(sites, rich.markup.escape(f"{checkpoint.name} ({loaded.arch}) at input {tuple(loaded.input_shape)}")))
        if loaded.arch_note:
            console.print(loaded.arch_note, highlight=False, soft_wrap=True, markup=False)
        data = {"arch": loaded.arch, "input_shape": list(loaded.input_shape), "layers": [s.describe() for s in sites]}
    if json_path is not None:
        with atomic_output(json_path) as tmp:
            tmp.write_text(_json.dumps(data, indent=2, sort_keys=True))


@app.command("compress")
def compress_command(
    checkpoint: _CPath = typer.Argument(..., help="The original model: a state dict (.safetensors/.pt/.pth/.bin) with --arch."),
    arch: str | None = typer.Option(None, "--arch", help="torchvision:NAME, timm:NAME or package.module:callable."),
    arch_kwargs: str | None = typer.Option(None, "--arch-kwargs", help="JSON keyword arguments for --arch."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a checkpoint that holds a pickled model (runs code from the file); then --arch is not needed."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="Example input shape, e.g. 1,3,224,224 or 1,1024 \\[default: from the arch config]."),
    rank: int | None = typer.Option(None, "--rank", help="Same rank r for every layer, capped at each layer's max useful rank floor(m·d/(m+d))."),
    rank_ratio: float | None = typer.Option(None, "--rank-ratio", help="r = round(F·min(m, d)) per layer (the paper's rank scale)."),
    param_ratio: float | None = typer.Option(None, "--param-ratio", help="Each layer keeps F of its own weights: r = floor(F·m·d/(m+d))."),
    target_params: float | None = typer.Option(None, "--target-params", help="The whole model keeps at most F of its parameters; ranks allocated by error per parameter."),
    target_flops: float | None = typer.Option(None, "--target-flops", help="The whole model keeps at most F of its FLOPs at the input shape; ranks allocated by error per FLOP."),
    method: str = typer.Option("nkp", "--method", help="nkp (nonlinear kernel projection) or spectral (SVD truncation)."),
    include: str | None = typer.Option(None, "--include", help="Only layers whose name matches this regex (searched)."),
    exclude: str | None = typer.Option(None, "--exclude", help="Skip layers whose name matches this regex (searched)."),
    round_to: int = typer.Option(1, "--round-to", help="Round ranks to multiples of N (hardware-friendly)."),
    calib: str | None = typer.Option(None, "--calib", help="Calibration inputs: an image folder, a tensor file (.npy/.pt/.safetensors, first axis = samples) or 'gaussian'."),
    calib_samples: int = typer.Option(256, "--calib-samples", help="Number of calibration samples."),
    calib_batch_size: int = typer.Option(32, "--calib-batch-size", help="Calibration batch size."),
    refine_steps: int = typer.Option(200, "--refine-steps", help="Adam steps per layer on the post-activation error (calibrated only; 0 disables)."),
    allocation: str = typer.Option("auto", "--allocation", help="Rank allocation under a budget, calibrated: output (by each layer's predicted effect on the model's output; auto) or layer (by each layer's own error)."),
    output_metric: str = typer.Option("auto", "--output-metric", help="What 'output' means: kl (softmax KL, classifiers), mse (relative squared error) or auto (kl when the model returns a Linear layer's (batch, classes) logits)."),
    block_steps: int = typer.Option(0, "--block-steps", help="Adam steps per block (residual block, transformer layer) fitting all its factors to the original block's output (calibrated; 0 disables)."),
    blocks: str | None = typer.Option(None, "--blocks", help="Regex (full match) of module names to use as blocks instead of the automatic choice."),
    distill_steps: int = typer.Option(0, "--distill-steps", help="Label-free distillation steps on the calibration inputs after the fits, the original model as teacher (calibrated; 0 disables)."),
    distill_features: float = typer.Option(0.0, "--distill-features", help="Weight of matching the blocks' outputs (standardized per channel) during distillation (0: outputs only)."),
    latency_aware: bool = typer.Option(False, "--latency-aware", help="Keep a layer dense where its factorized form is not faster (timed on this machine); budgets are re-allocated."),
    latency_runtime: str = typer.Option("torch", "--latency-runtime", help="Runtime to time layers on for --latency-aware: torch or onnxruntime."),
    latency_batch_size: int = typer.Option(1, "--latency-batch-size", help="Batch size to time layers at for --latency-aware (the deployment batch)."),
    max_output_error: float | None = typer.Option(None, "--max-output-error", help="CI gate: exit 3 when the model's relative output error exceeds F (outputs are still written)."),
    onnx_path: _CPath | None = typer.Option(None, "--onnx", help="Also export the compressed model to ONNX here and verify parity."),
    plot: _CPath | None = typer.Option(None, "--plot", help="Write per-layer error-vs-rank curves and the chosen ranks to this PNG."),
    seed: int = typer.Option(0, "--seed", help="Seed for example inputs, calibration sampling and refinement."),
    output: _CPath | None = typer.Option(None, "-o", "--output", help="Output file \\[default: CKPT stem + .lrc.safetensors]."),
    json_path: _CPath | None = typer.Option(None, "--json", help="Write the report as JSON here."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or tables (for CI logs); errors still print."),
) -> None:
    """Factorize every eligible Linear/Conv layer, initialized to keep each layer's output after its activation."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .checkpoint import parse_arch_kwargs, parse_input_shape
    from .compress import CompressConfig
    from .fileio import check_distinct_paths
    from .pipeline import CompressJob, default_output, run_compress
    from .tables import report_table, skipped_table, totals_table

    check_distinct_paths(
        {"CHECKPOINT": checkpoint, "--calib": calib if calib not in (None, "gaussian") else None},
        {"-o": output or default_output(checkpoint), "--json": json_path, "--onnx": onnx_path, "--plot": plot},
    )
    if not 0 <= seed < 2**63:  # torch seeds are 64-bit
        raise UsageError(f"--seed must be an integer in [0, 2^63), got {seed}")
    config = CompressConfig(
        method=method, rank=rank, rank_ratio=rank_ratio, param_ratio=param_ratio, target_params=target_params,
        target_flops=target_flops, include=include, exclude=exclude, round_to=round_to, refine_steps=refine_steps,
        calib_samples=calib_samples, latency_aware=latency_aware, latency_runtime=latency_runtime,
        latency_batch_size=latency_batch_size, allocation=allocation, output_metric=output_metric,
        block_steps=block_steps, blocks=blocks, distill_steps=distill_steps, distill_features=distill_features,
        seed=seed,
    )
    if calib_batch_size < 1:
        raise UsageError(f"--calib-batch-size must be ≥ 1, got {calib_batch_size}")
    job = CompressJob(
        checkpoint=checkpoint, config=config, output=output, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs),
        trust_pickle=trust_pickle, input_shape=parse_input_shape(input_shape), calib=calib,
        calib_batch_size=calib_batch_size, json_path=json_path, onnx_path=onnx_path, plot_path=plot,
        max_output_error=max_output_error,
    )
    progress = Progress(TextColumn("[bold]compress[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=console, disable=quiet, transient=True)
    task = progress.add_task("", total=None)

    def on_layer(name: str, done: int, total: int) -> None:
        progress.update(task, completed=done, total=total, description=name)

    with progress:
        result = run_compress(job, on_layer, raise_on_failure=False)
    report = result.report
    if not quiet:
        out.print(report_table(report))
        if report.skipped:
            out.print(skipped_table(report.skipped))
        out.print(totals_table(report))
        for note in report.notes:
            console.print(f"[yellow]note:[/] {note}")
        if result.parity is not None:
            out.print(f"ONNX {onnx_path}: max abs error {result.parity.max_abs_error:.2e}, max rel error {result.parity.max_rel_error:.2e}")
    if result.loaded.arch_note:
        console.print(result.loaded.arch_note, highlight=False, soft_wrap=True, markup=False)
    console.print(f"wrote {result.output}", highlight=False, soft_wrap=True, markup=False)
    if result.failure is not None:
        raise result.failure

# --- export / bench commands ---

from pathlib import Path as _XPath  # noqa: E402

_ARCH_HELP = "Architecture of a state-dict checkpoint: torchvision:NAME, timm:NAME or package.module:callable."


def _model_shape(loaded_shape: tuple[int, ...] | None, given: tuple[int, ...] | None, path: _XPath) -> tuple[int, ...]:
    shape = given or loaded_shape
    if shape is None:
        raise UsageError(f"cannot tell the input shape of {path}; pass --input-shape, e.g. 1,3,224,224")
    return tuple(shape)


@app.command("export")
def export_command(
    model: _XPath = typer.Argument(..., help="A compressed .lrc.safetensors, or an original checkpoint with --arch."),
    onnx: _XPath = typer.Option(..., "--onnx", help="Where to write the ONNX file (written atomically)."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="N,C,H,W (or N,D) to trace at; the batch axis stays dynamic \\[default: the model's recorded shape, else the arch config]."),
    opset: int = typer.Option(17, "--opset", help="ONNX opset (7–20 with the torchscript exporter, up to 23 with dynamo)."),
    exporter: str = typer.Option("auto", "--exporter", help="torchscript, dynamo, or auto (torchscript, then dynamo where it fails)."),
    rtol: float = typer.Option(1e-4, "--rtol", help="Parity tolerance on max|onnx − torch| / max|torch| over the checked inputs."),
    arch: str | None = typer.Option(None, "--arch", help=_ARCH_HELP),
    arch_kwargs: str | None = typer.Option(None, "--arch-kwargs", help="JSON keyword arguments for --arch."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a checkpoint holding a pickled model (runs code from the file)."),
    calib: str | None = typer.Option(None, "--calib", help="Also compare on these inputs: an image folder, a tensor file (.npy/.pt/.safetensors, first axis = samples) or 'gaussian'."),
    calib_samples: int = typer.Option(32, "--calib-samples", help="At most this many --calib samples."),
    json_path: _XPath | None = typer.Option(None, "--json", help="Write the parity report here as JSON."),
) -> None:
    """Export to ONNX (input "input", output "output", dynamic batch), check it, compare with PyTorch in onnxruntime."""
    from rich.table import Table

    from .checkpoint import open_model, parse_arch_kwargs, parse_input_shape
    from .evaluate import write_json
    from .export import export_onnx
    from .fileio import check_distinct_paths, check_writable

    check_distinct_paths({"MODEL": model, "--calib": calib if calib != "gaussian" else None}, {"--onnx": onnx, "--json": json_path})
    shape = parse_input_shape(input_shape)
    if not rtol > 0:
        raise UsageError(f"--rtol must be positive, got {rtol}")
    check_writable(onnx)
    if json_path is not None:
        check_writable(json_path)
    loaded = open_model(model, arch, parse_arch_kwargs(arch_kwargs), trust_pickle, shape)
    shape = _model_shape(loaded.input_shape, shape, model)
    calib_inputs = None
    if calib is not None:
        from .calibdata import calibration_batches
        from .export import CALIB_CHUNK

        calib_inputs = calibration_batches(calib, shape, loaded.data_config, calib_samples, CALIB_CHUNK)
    report = export_onnx(loaded.model, onnx, shape, opset=opset, rtol=rtol, calib_inputs=calib_inputs, exporter=exporter)
    table = Table(title=rich.markup.escape(f"{onnx} ({report.exporter} exporter, opset {report.opset})"))
    for column in ("max abs error", "max rel error", "tolerance", "checked", "parity"):
        table.add_column(column, justify="right")
    checked = f"batches {','.join(map(str, report.batch_sizes))}" + (f" + {report.calib_samples} calib" if report.calib_samples else "")
    table.add_row(
        f"{report.max_abs_error:.2e}", f"{report.max_rel_error:.2e}", f"{rtol:.0e}", checked,
        "[green]pass[/]" if report.passed else "[red]FAIL[/]",
    )
    out.print(table)
    ops = ", ".join(report.op_types)
    out.print(f"ops: {ops}" + (f"; non-standard: {', '.join(report.nonstandard_ops)}" if report.nonstandard_ops else ""), highlight=False)
    if json_path is not None:
        write_json(report.to_dict(), json_path)
    if not report.passed:
        raise LrcError(
            f"ONNX parity failed: max relative error {report.max_rel_error:.2e} > tolerance {rtol:.0e}; "
            f"{onnx} was kept for inspection"
        )


def _parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(p) for p in text.replace(" ", "").split(",") if p]
    except ValueError:
        raise UsageError(f"bad --batch-sizes {text!r}: use comma-separated integers such as 1,32") from None
    if not sizes or any(s < 1 for s in sizes):
        raise UsageError(f"bad --batch-sizes {text!r}: every batch size must be a positive integer")
    return sizes


def _bench_subject(path: _XPath, arch: str | None, kwargs: dict, trust_pickle: bool, shape: tuple[int, ...] | None):
    """(model or ONNX path, its recorded input shape) for one file given to ``lrc bench``."""
    from .checkpoint import open_model
    from .export import onnx_input_shape

    if path.suffix == ".onnx":
        if not path.is_file():
            raise UsageError(f"no such file: {path}")
        return path, onnx_input_shape(path)
    loaded = open_model(path, arch, kwargs, trust_pickle, shape)
    return loaded.model, loaded.input_shape


@app.command("bench")
def bench_command(
    model: _XPath = typer.Argument(..., help="A compressed .lrc.safetensors, an original checkpoint with --arch, or an .onnx file."),
    vs: _XPath | None = typer.Option(None, "--vs", help="Baseline to compare with (same kinds of file as MODEL); ratios are MODEL / baseline."),
    arch: str | None = typer.Option(None, "--arch", help=_ARCH_HELP + " Used for whichever file needs it."),
    arch_kwargs: str | None = typer.Option(None, "--arch-kwargs", help="JSON keyword arguments for --arch."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow checkpoints holding pickled models (runs code from the file)."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="N,C,H,W (or N,D); N is replaced by each batch size \\[default: the model's recorded shape]."),
    runtime: str = typer.Option("torch", "--runtime", help="torch or onnxruntime (CPU; modules are exported to a temporary ONNX file)."),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu (torch runtime; CUDA runs are timed with CUDA events)."),
    threads: int | None = typer.Option(None, "--threads", help="Intra-op threads of the runtime \\[default: the runtime's own]."),
    batch_sizes: str = typer.Option("1,32", "--batch-sizes", help="Comma-separated batch sizes to time."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed rounds before timing."),
    repeats: int = typer.Option(10, "--repeats", help="Timed rounds; each runs every model once, interleaved."),
    json_path: _XPath | None = typer.Option(None, "--json", help="Write params, FLOPs, latencies and ratios here as JSON."),
    max_latency_ratio: float | None = typer.Option(None, "--max-latency-ratio", help="Exit 3 when MODEL's latency / the baseline's exceeds this at any batch size; the JSON is still written."),
) -> None:
    """Params, FLOPs and median latency (interleaved runs in one process), with ratios against --vs."""
    import torch
    from rich.table import Table

    from .bench import RUNTIMES, count_flops, count_onnx_params, count_params, measure_latency
    from .checkpoint import parse_arch_kwargs, parse_input_shape
    from .errors import BudgetExceeded
    from .evaluate import write_json
    from .fileio import check_distinct_paths, check_writable

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
    shape = _model_shape(None, shape, model)

    sizes_info: dict[str, dict] = {}
    for name, (path, item, _) in subjects.items():
        if isinstance(item, torch.nn.Module):
            info = {"path": str(path), "params": count_params(item), "flops": count_flops(item, (1, *shape[1:]))}
        else:
            info = {"path": str(path), "params": count_onnx_params(item), "flops": None}
        sizes_info[name] = info
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

# --- eval / finetune commands ---

from pathlib import Path as _Path  # noqa: E402

from .recipes import TrainConfig as _TrainConfig  # noqa: E402  (torch-free: only for the help defaults)

_TD = _TrainConfig()


@app.command("eval")
def eval_command(
    model: _Path = typer.Argument(..., help="A compressed .lrc.safetensors, or an original checkpoint with --arch."),
    data: _Path = typer.Option(..., "--data", help="Dataset root holding DIR/<split>/<class>/<image>."),
    split: str = typer.Option("val", "--split", help="Which split folder to evaluate."),
    arch: str | None = typer.Option(None, "--arch", help="Architecture of an original checkpoint: torchvision:NAME, timm:NAME or package.module:callable."),
    arch_kwargs: str | None = typer.Option(None, "--arch-kwargs", help="JSON keyword arguments for --arch."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="N,C,H,W to evaluate at (default: the model's recorded input shape, else the arch config)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per batch."),
    workers: int = typer.Option(4, "--workers", help="DataLoader worker processes."),
    json_path: _Path | None = typer.Option(None, "--json", help="Write {top1, top5, samples} (fractions in [0, 1]) here."),
    min_top1: float | None = typer.Option(None, "--min-top1", help="Exit 3 when top-1 (a fraction) is below this budget; the JSON is still written."),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a checkpoint holding a pickled model (runs code from the file)."),
) -> None:
    """Top-1 / top-5 accuracy on an ImageFolder split, at the model's input size and eval transform."""
    from rich.table import Table

    from .checkpoint import open_model, parse_arch_kwargs, parse_input_shape
    from .evaluate import check_budget, evaluate_folder, resolve_device, validate_outputs, write_json
    from .fileio import check_distinct_paths

    check_distinct_paths({"MODEL": model, "--data": data}, {"--json": json_path})
    validate_outputs(json_path, min_top1)
    dev = resolve_device(device)
    loaded = open_model(model, arch, parse_arch_kwargs(arch_kwargs), trust_pickle, parse_input_shape(input_shape))
    result = evaluate_folder(loaded, data, split, batch_size, workers, dev)
    table = Table(title=rich.markup.escape(f"{model.name} on {result['split']}"))
    for column in ("top-1", "top-5", "images", "input"):
        table.add_column(column, justify="right")
    table.add_row(f"{result['top1']:.4f}", f"{result['top5']:.4f}", str(result["samples"]), "×".join(map(str, result["input_size"])))
    out.print(table)
    if json_path is not None:
        write_json({"top1": result["top1"], "top5": result["top5"], "samples": result["samples"]}, json_path)
    check_budget(result, min_top1)


@app.command("finetune")
def finetune_command(
    model: _Path | None = typer.Argument(None, help="The model to train: a .lrc.safetensors, or an original checkpoint with --arch. Omit with --from-scratch."),
    data: _Path = typer.Option(..., "--data", help="Dataset root: DIR/train/<class>/<image>, and DIR/val/… for an evaluation after each epoch."),
    output: _Path = typer.Option(..., "-o", "--output", help="Where to write the trained model (.lrc.safetensors)."),
    teacher: _Path | None = typer.Option(None, "--teacher", help="Original (uncompressed) model to distill from; a state dict takes --arch."),
    no_teacher: bool = typer.Option(False, "--no-teacher", help="Train with cross-entropy only."),
    recipe: _Path | None = typer.Option(None, "--recipe", help="YAML recipe of defaults (recipes/*.yaml); explicit flags override it."),
    arch: str | None = typer.Option(None, "--arch", help="Architecture of a state-dict MODEL / teacher, or the one to build with --from-scratch."),
    arch_kwargs: str | None = typer.Option(None, "--arch-kwargs", help="JSON keyword arguments for --arch."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="N,C,H,W training input (default: the model's recorded shape, else the arch config)."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow checkpoints holding pickled models (runs code from the file)."),
    from_scratch: bool | None = typer.Option(None, "--from-scratch", help="Build --arch with random init, factorize it data-free, and train it (no MODEL)."),
    method: str | None = typer.Option(None, "--method", help="Factorization for --from-scratch: nkp (default) or spectral."),
    rank: int | None = typer.Option(None, "--rank", help="--from-scratch: the same rank for every layer."),
    rank_ratio: float | None = typer.Option(None, "--rank-ratio", help="--from-scratch: rank = ratio × min(m, d) per layer."),
    param_ratio: float | None = typer.Option(None, "--param-ratio", help="--from-scratch: each layer keeps this fraction of its parameters."),
    epochs: int | None = typer.Option(None, "--epochs", help=f"Epochs (default {_TD.epochs})."),
    batch_size: int | None = typer.Option(None, "--batch-size", help=f"Global batch (images per step over all processes) (default {_TD.batch_size})."),
    lr: float | None = typer.Option(None, "--lr", help=f"Peak learning rate, used as given (a recipe's lr is scaled by batch/base_batch) (default {_TD.lr})."),
    optimizer: str | None = typer.Option(None, "--optimizer", help=f"sgd or adamw (default {_TD.optimizer})."),
    momentum: float | None = typer.Option(None, "--momentum", help=f"SGD momentum (default {_TD.momentum})."),
    weight_decay: float | None = typer.Option(None, "--weight-decay", help=f"Weight decay of weights (not biases or norms) (default {_TD.weight_decay})."),
    frobenius_decay: float | None = typer.Option(None, "--frobenius-decay", help="Penalty λ/2·‖AB‖²_F on each factorized layer's product, instead of plain decay on its factors (default off)."),
    warmup_steps: int | None = typer.Option(None, "--warmup-steps", help=f"Linear warm-up steps before the cosine decay (default {_TD.warmup_steps})."),
    label_smoothing: float | None = typer.Option(None, "--label-smoothing", help=f"Cross-entropy label smoothing (default {_TD.label_smoothing})."),
    kd_temperature: float | None = typer.Option(None, "--kd-temperature", help=f"Distillation temperature T (default {_TD.kd_temperature})."),
    kd_weight: float | None = typer.Option(None, "--kd-weight", help=f"Weight of the KD term; CE gets 1 − weight (default {_TD.kd_weight})."),
    clip_grad: float | None = typer.Option(None, "--clip-grad", help="Clip the gradient norm to this value (default off)."),
    ema: float | None = typer.Option(None, "--ema", help="Keep an EMA of the weights with this decay; it is evaluated and written (default off)."),
    workers: int | None = typer.Option(None, "--workers", help=f"DataLoader workers per process (default {_TD.workers})."),
    seed: int | None = typer.Option(None, "--seed", help=f"Seed of data order, augmentation and init (default {_TD.seed})."),
    checkpoint_dir: _Path | None = typer.Option(None, "--checkpoint-dir", help="Write a resumable checkpoint (last.pt) here at each epoch end."),
    checkpoint_every: int | None = typer.Option(None, "--checkpoint-every", help="Also checkpoint every N steps."),
    resume: bool = typer.Option(False, "--resume", help="Continue from --checkpoint-dir/last.pt when it exists."),
    log: _Path | None = typer.Option(None, "--log", "--log-file", help="Append JSON-lines records (steps, epochs) to this file. Under torchrun spell it --log-file: torchrun takes --log as an abbreviation of its own options."),
    log_every: int | None = typer.Option(None, "--log-every", help=f"Steps between log records (default {_TD.log_every})."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after this many steps in total (the schedule still spans --epochs)."),
    min_crop_scale: float | None = typer.Option(None, "--min-crop-scale", help=f"RandomResizedCrop's smallest area fraction (default {_TD.min_crop_scale})."),
    hflip: float | None = typer.Option(None, "--hflip", help=f"Horizontal flip probability (default {_TD.hflip})."),
    precision: str | None = typer.Option(None, "--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU), bf16, fp16 or fp32."),
    train_split: str | None = typer.Option(None, "--train-split", help=f"Training split folder under --data (default {_TD.train_split})."),
    val_split: str | None = typer.Option(None, "--val-split", help=f"Split evaluated after each epoch, when it exists (default {_TD.val_split})."),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu (under torchrun each process uses GPU LOCAL_RANK)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
) -> None:
    """Fine-tune a compressed model (distillation or cross-entropy), or train one from scratch; DDP under torchrun."""
    from dataclasses import fields

    from .checkpoint import open_model, parse_arch_kwargs, parse_input_shape
    from .fileio import check_distinct_paths
    from .recipes import load_recipe, resolve_options
    from .train import build_from_scratch, finetune

    check_distinct_paths(
        {"MODEL": model, "--teacher": teacher, "--data": data, "--recipe": recipe},
        {"-o": output, "--log-file": log, "--checkpoint-dir": None if checkpoint_dir is None else checkpoint_dir / "last.pt"},
    )
    if checkpoint_dir is not None and checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise UsageError(f"--checkpoint-dir {checkpoint_dir} is a file, not a folder")
    given = dict(
        epochs=epochs, batch_size=batch_size, lr=lr, optimizer=optimizer, momentum=momentum,
        weight_decay=weight_decay, frobenius_decay=frobenius_decay, warmup_steps=warmup_steps,
        label_smoothing=label_smoothing, kd_temperature=kd_temperature, kd_weight=kd_weight,
        clip_grad=clip_grad, ema=ema, workers=workers, seed=seed, checkpoint_every=checkpoint_every,
        log_every=log_every, max_steps=max_steps, min_crop_scale=min_crop_scale, hflip=hflip, precision=precision,
        train_split=train_split, val_split=val_split,
        from_scratch=from_scratch, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs) or None,
        input_shape=list(parse_input_shape(input_shape) or []) or None, method=method, rank=rank,
        rank_ratio=rank_ratio, param_ratio=param_ratio,
    )
    values = resolve_options(load_recipe(recipe) if recipe is not None else {}, given)
    config = _TrainConfig(**{f.name: values[f.name] for f in fields(_TrainConfig) if f.name in values})
    shape = tuple(values["input_shape"]) if values.get("input_shape") else None
    if teacher is not None and no_teacher:
        raise UsageError("--teacher and --no-teacher exclude each other")
    if values.get("from_scratch"):
        if model is not None:
            raise UsageError("--from-scratch builds the model from --arch; drop MODEL")
        if not values.get("arch"):
            raise UsageError("--from-scratch needs --arch")
    else:
        if model is None:
            raise UsageError("missing MODEL (or pass --from-scratch --arch SPEC)")
        if teacher is None and not no_teacher:
            raise UsageError("pass --teacher ORIGINAL to distill from the uncompressed model, or --no-teacher")
        if any(values.get(k) is not None for k in ("rank", "rank_ratio", "param_ratio", "method")):
            raise UsageError("--rank, --rank-ratio, --param-ratio and --method only apply with --from-scratch")
    if values.get("from_scratch"):
        student = build_from_scratch(
            values["arch"], values.get("arch_kwargs"), shape, values.get("method") or "nkp",
            values.get("rank"), values.get("rank_ratio"), values.get("param_ratio"), config.seed,
        )
    else:
        student = open_model(model, values.get("arch"), values.get("arch_kwargs"), trust_pickle, shape)
    teacher_model = (
        open_model(teacher, values.get("arch"), values.get("arch_kwargs"), trust_pickle).model if teacher is not None else None
    )
    result = finetune(
        student, data, output, config, teacher=teacher_model, checkpoint_dir=checkpoint_dir, resume=resume,
        log_path=log, device=device, show_progress=not quiet,
    )
    if os.environ.get("RANK", "0") == "0":
        val = f", val top-1 {result.val['top1']:.4f}" if result.val else ""
        stop = " (stopped at --max-steps)" if result.stopped_at_max_steps else ""
        out.print(f"wrote {result.output}: {result.steps} steps{stop}{val}", highlight=False)

# --- demo command ---

from pathlib import Path as _DPath  # noqa: E402


@app.command("demo")
def demo_command(
    out_dir: _DPath = typer.Option(_DPath("lrc-demo"), "--out", help="Folder for report.json, summary.md, the PNG plots and the fine-tuned model (created if missing; files in it are replaced)."),
    fast: bool = typer.Option(False, "--fast", help="Less calibration, refinement and fine-tuning, and no data-free nkp row (what the test suite runs, well under a minute)."),
) -> None:
    """Compress the bundled digits CNN (spectral vs nkp, two budgets), fine-tune, export to ONNX, write a report."""
    from rich.table import Table

    from .demo import percent, run_demo

    result = run_demo(out_dir, fast=fast, log=lambda message: console.print(f"[dim]demo:[/] {message}", highlight=False))
    o = result.original
    table = Table(title=f"digits CNN before fine-tuning ({o['test_samples']} held-out digits)", title_justify="left")
    for column in ("method", "--target-params", "params kept", "FLOPs kept", "test accuracy"):
        table.add_column(column, justify="left" if column == "method" else "right")
    table.add_row(f"original ({o['params']:,} params)", "–", "1.000", "1.000", percent(o["accuracy"]))
    for run in result.runs:
        table.add_row(run.label, str(run.target_params), f"{run.param_ratio:.3f}", f"{run.flop_ratio:.3f}", percent(run.accuracy))
    out.print(table)
    ft, onnx = result.finetune, result.onnx
    out.print(f"fine-tuned {ft['run']} ({ft['steps']} steps of distillation): test accuracy "
              f"{percent(ft['accuracy_before'])} → {percent(ft['accuracy_after'])}", highlight=False)
    out.print(f"ONNX {onnx['file']}: max abs error {onnx['max_abs_error']:.2e}, parity "
              f"{'passed' if onnx['passed'] else 'FAILED'}", highlight=False)
    out.print(f"report: {result.out_dir / 'summary.md'} (and report.json, error_vs_rank.png, accuracy_vs_params.png) "
              f"in {result.seconds:.0f} s", highlight=False)


def _fail(message: str, code: int) -> None:
    first = " ".join(str(message).strip().splitlines()[:1]) or "unknown error"
    # Escaped: a path or message with [brackets] is text, not rich markup.
    console.print(f"[bold red]error:[/] {rich.markup.escape(first)}", highlight=False, markup=True, soft_wrap=True)
    sys.exit(code)


# Typer ≥ 0.16 ships its own copy of click: catch both its exceptions and click's.
_EXIT = (click.exceptions.Exit, typer.Exit)
_ABORT = (click.exceptions.Abort, typer.Abort)
_PARSE_ERRORS = (click.exceptions.ClickException, typer.TyperException)
# The exit code of the signal (SIGINT or SIGTERM) that stopped the running command, if one did.
_SIGNALLED: dict[str, int | None] = {"code": None}


def _on_signal(signum: int, frame) -> None:
    _SIGNALLED["code"] = 128 + signum
    raise KeyboardInterrupt


def _interrupted() -> None:
    import signal

    code = _SIGNALLED["code"] or 130
    what = "terminated" if code == 128 + signal.SIGTERM else "interrupted"
    _fail(f"{what}; no partial output was written", code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turning every failure into one line and an exit code.

    Ctrl-C (SIGINT) and SIGTERM (what CI runners send on cancel) raise KeyboardInterrupt, so every
    output in progress is removed on the way up, and exit with 130 or 143 and one line, however a
    library on the way wrapped the interrupt. A signal the parent process ignores stays ignored.
    """
    import signal
    import threading

    _SIGNALLED["code"] = None
    installed = {}
    if threading.current_thread() is threading.main_thread():
        for sig, default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
            if signal.getsignal(sig) == default:
                installed[sig] = signal.signal(sig, _on_signal)
    try:
        _main(argv)
    finally:
        for sig, previous in installed.items():
            signal.signal(sig, previous)


# No command uses the network: the Hugging Face libraries (timm's Hub access) are switched offline.
_OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _go_offline() -> None:
    os.environ.update(_OFFLINE)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:  # imported before main() ran: it read the environment already
        constants.HF_HUB_OFFLINE = True


@contextlib.contextmanager
def _library_output(debug: bool) -> Iterator[None]:
    """Keep third-party warnings and log records off stderr, where a failure is one line; --debug shows them.

    Libraries log with handlers of their own (torch's fake-tensor errors print whole tracebacks), so
    logging is switched off for the command rather than only left without a root handler.
    """
    root = logging.getLogger()
    handler: logging.Handler = logging.StreamHandler(sys.stderr) if debug else logging.NullHandler()
    root.addHandler(handler)  # a handler on the root logger also keeps logging's last-resort printer quiet
    disabled = logging.root.manager.disable
    if not debug:
        logging.disable(logging.CRITICAL)
    with warnings.catch_warnings():
        warnings.simplefilter("default" if debug else "ignore")
        logging.captureWarnings(True)
        try:
            yield
        finally:
            logging.captureWarnings(False)
            logging.disable(disabled)
            root.removeHandler(handler)


def _main(argv: list[str] | None) -> None:
    debug = "--debug" in (argv if argv is not None else sys.argv[1:]) or os.environ.get("LRC_DEBUG") == "1"
    _go_offline()
    with _library_output(debug):
        _run(argv, debug)


def _run(argv: list[str] | None, debug: bool) -> None:
    try:
        code = app(args=argv, standalone_mode=False, prog_name="lrc")
    except _EXIT as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, *_ABORT):
        _interrupted()
    except _PARSE_ERRORS as exc:
        if debug:
            traceback.print_exc()
        _fail(exc.format_message() if hasattr(exc, "format_message") else str(exc), 2)
    except Exception as exc:
        if _SIGNALLED["code"] is not None:
            _interrupted()  # a library turned the KeyboardInterrupt into an error of its own
        if debug:
            traceback.print_exc()
        _fail(*_message(exc))
    # Typer ≥ 0.16 turns a KeyboardInterrupt into exit code 130 and, with standalone_mode=False,
    # returns that code instead of raising.
    if isinstance(code, int) and not isinstance(code, bool) and code != 0:
        if code == 130 or _SIGNALLED["code"] is not None:
            _interrupted()
        sys.exit(code)


def _message(exc: Exception) -> tuple[str, int]:
    """The one line and the exit code for a failure (any other failure still ends in one line)."""
    text = str(exc).strip() or type(exc).__name__
    if text.startswith("Caught ") and "Original Traceback" in text:
        # Re-raised from a DataLoader worker: the original error is the traceback's last line.
        text = text.splitlines()[-1].split(": ", 1)[-1].strip() or text
    if isinstance(exc, LrcError):
        return text, exc.exit_code
    if isinstance(exc, ValueError):
        return text, UsageError.exit_code
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, PermissionError)):
        return text, 1
    if isinstance(exc, MemoryError):
        return "out of memory" + (f" ({text})" if text != "MemoryError" else ""), 1
    return (text if text == type(exc).__name__ else f"{type(exc).__name__}: {text}"), 1
