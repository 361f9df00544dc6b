"""``lrc compress``: factorize a checkpoint into a ``.lrc.safetensors``."""

from __future__ import annotations

from pathlib import Path

import typer

from .app import app, console, out


@app.command("compress")
def compress_command(
    checkpoint: Path = typer.Argument(..., help="The original model: a state dict (.safetensors/.pt/.pth/.bin) with --arch."),
    arch: str | None = typer.Option(None, "--arch", help="torchvision:NAME, timm:NAME or package.module:callable."),
    arch_kwargs: str | None = typer.Option(None, "--arch-kwargs", help="JSON keyword arguments for --arch."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a checkpoint that holds a pickled model (runs code from the file); then --arch is not needed."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="Example input shape, e.g. 1,3,224,224 or 1,1024 \\[default: from the arch config]."),
    rank: int | None = typer.Option(None, "--rank", help="Same rank r for every layer, capped at each layer's max useful rank floor(m·d/(m+d))."),
    rank_ratio: float | None = typer.Option(None, "--rank-ratio", help="r = round(F·min(m, d)) per layer (the paper's rank scale)."),
    param_ratio: float | None = typer.Option(None, "--param-ratio", help="Each layer keeps F of its own weights: r = floor(F·m·d/(m+d))."),
    target_params: float | None = typer.Option(None, "--target-params", help="The whole model keeps at most F of its parameters; ranks allocated by error per parameter."),
    target_flops: float | None = typer.Option(None, "--target-flops", help="The whole model keeps at most F of its FLOPs at the input shape; with latency-aware planning (default) allocated by error per second of measured layer time, layers that do not pay kept dense, and the planned model timed whole: it must measure below 0.97× the dense time."),
    target_latency: float | None = typer.Option(None, "--target-latency", help="The compressed model's measured latency on --target is at most F × the dense model's; ranks allocated by error per second of measured layer time."),
    method: str = typer.Option("nkp", "--method", help="nkp (nonlinear kernel projection) or spectral (SVD truncation)."),
    include: str | None = typer.Option(None, "--include", help="Only layers whose name matches this regex (searched)."),
    exclude: str | None = typer.Option(None, "--exclude", help="Skip layers whose name matches this regex (searched)."),
    round_to: int | None = typer.Option(None, "--round-to", help="Round ranks to multiples of N \\[default: the target's multiple for budgets (16 on CPU, 8 on CUDA), none for --rank/--rank-ratio/--param-ratio]."),
    calib: str | None = typer.Option(None, "--calib", help="Calibration inputs: an image folder, a tensor file (.npy/.pt/.safetensors, first axis = samples) or 'gaussian'."),
    calib_samples: int = typer.Option(256, "--calib-samples", help="Number of calibration samples; a folder of fewer images is filled up with random views of them."),
    calib_batch_size: int = typer.Option(32, "--calib-batch-size", help="Calibration batch size."),
    refine_steps: int = typer.Option(200, "--refine-steps", help="Adam steps per layer on the post-activation error (calibrated only; 0 disables)."),
    allocation: str = typer.Option("auto", "--allocation", help="Rank allocation under a budget, calibrated: output (by each layer's predicted effect on the model's output; auto) or layer (by each layer's own error)."),
    output_metric: str = typer.Option("auto", "--output-metric", help="What 'output' means: kl (softmax KL, classifiers), mse (relative squared error) or auto (kl when the model returns a Linear layer's (batch, classes) logits)."),
    block_steps: int = typer.Option(200, "--block-steps", help="Adam steps per block (residual block, transformer layer) fitting all its factors to the original block's output (calibrated; 0 disables)."),
    blocks: str | None = typer.Option(None, "--blocks", help="Regex (full match) of module names to use as blocks instead of the automatic choice."),
    distill_steps: int | None = typer.Option(None, "--distill-steps", help="Label-free distillation steps after the fits, the original model as teacher, on the calibration inputs (on new random views of a folder of fewer images than --calib-samples) (calibrated; default: automatic, up to 1000 within a compute budget; 0 disables)."),
    distill_lr: str | None = typer.Option(None, "--distill-lr", help="Distillation's Adam step relative to each factor's RMS \\[default: auto, the first steps of the run at 0.1, 0.03, 0.01, 0.003 and 0.001 each, compared on the held-out check]."),
    distill_features: float = typer.Option(0.0, "--distill-features", help="Weight of matching the blocks' outputs (standardized per channel) during distillation (0: outputs only)."),
    target: str = typer.Option("onnxruntime-cpu", "--target", help="Where the model will run: onnxruntime-cpu, torch-cpu, torch-cuda or onnxruntime-cuda. Sets the rank rounding and where layers are timed."),
    latency_aware: bool | None = typer.Option(None, "--latency-aware/--no-latency-aware", help="Time each layer dense vs factorized on --target at its real input shape and keep it dense where factorizing does not pay \\[default: on with --target-flops/--target-latency]."),
    latency_batch_size: str = typer.Option("1,16", "--latency-batch-size", help="Comma-separated batch sizes layers are timed at (the deployment batches); a factorization must pay at each."),
    timing_cache: Path | None = typer.Option(None, "--timing-cache", help="JSON file of measured layer timings: reused where it has them, new ones added (created if missing); the same command then makes the same plan on this machine."),
    max_output_error: float | None = typer.Option(None, "--max-output-error", help="CI gate: exit 3 when the model's relative output error exceeds F (outputs are still written)."),
    onnx_path: Path | None = typer.Option(None, "--onnx", help="Also export the compressed model to ONNX here and verify parity."),
    plot: Path | None = typer.Option(None, "--plot", help="Write per-layer error-vs-rank curves and the chosen ranks to this PNG."),
    seed: int = typer.Option(0, "--seed", help="Seed for example inputs, calibration sampling and refinement."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Output file \\[default: CKPT stem + .lrc.safetensors]."),
    json_path: Path | None = typer.Option(None, "--json", help="Write the report as JSON here."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or tables (for CI logs); errors still print."),
) -> None:
    """Factorize every eligible Linear/Conv layer, initialized to keep each layer's output after its activation."""
    from ..compress import CompressConfig
    from ..io.checks import parse_arch_kwargs, parse_input_shape
    from ..io.files import check_distinct_paths
    from ..pipeline import CompressJob, default_output, run_compress
    from .render import compress_progress, print_compress_result

    check_distinct_paths(
        {"CHECKPOINT": checkpoint, "--calib": calib if calib not in (None, "gaussian") else None},
        {"-o": output or default_output(checkpoint), "--json": json_path, "--onnx": onnx_path, "--plot": plot,
         "--timing-cache": timing_cache},
    )
    config = CompressConfig(
        method=method, rank=rank, rank_ratio=rank_ratio, param_ratio=param_ratio, target_params=target_params,
        target_flops=target_flops, target_latency=target_latency, include=include, exclude=exclude, round_to=round_to, refine_steps=refine_steps,
        calib_samples=calib_samples, latency_aware=latency_aware, target=target,
        latency_batch_size=latency_batch_size, allocation=allocation, output_metric=output_metric,
        block_steps=block_steps, blocks=blocks, distill_steps=distill_steps, distill_features=distill_features,
        distill_lr=_step_size(distill_lr), seed=seed,
    )
    job = CompressJob(
        checkpoint=checkpoint, config=config, output=output, arch=arch, arch_kwargs=parse_arch_kwargs(arch_kwargs),
        trust_pickle=trust_pickle, input_shape=parse_input_shape(input_shape), calib=calib,
        calib_batch_size=calib_batch_size, json_path=json_path, onnx_path=onnx_path, plot_path=plot,
        max_output_error=max_output_error, timing_cache=timing_cache,
    )
    progress, on_layer = compress_progress(console, quiet)
    with progress:
        result = run_compress(job, on_layer, raise_on_failure=False)
    print_compress_result(out, console, result, onnx_path, quiet)
    if result.failure is not None:
        raise result.failure


def _step_size(text: str | None) -> float | str | None:
    """``--distill-lr``: a number, or ``auto`` (the probe)."""
    if text is None or text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        from ..errors import UsageError

        raise UsageError(f"--distill-lr must be a positive number or 'auto', got {text!r}") from None
