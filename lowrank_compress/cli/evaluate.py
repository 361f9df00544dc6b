"""``lrc eval``: top-1 / top-5 accuracy on an image folder."""

from __future__ import annotations

from pathlib import Path

import rich.markup
import typer

from .app import app, out


@app.command("eval")
def eval_command(
    model: Path = typer.Argument(..., help="A compressed .lrc.safetensors, or an original checkpoint with --arch."),
    data: Path = typer.Option(..., "--data", help="Dataset root holding DIR/<split>/<class>/<image>."),
    split: str = typer.Option("val", "--split", help="Which split folder to evaluate."),
    arch: str | None = typer.Option(None, "--arch", help="Architecture of an original checkpoint: torchvision:NAME, timm:NAME or package.module:callable."),
    arch_kwargs: str | None = typer.Option(None, "--arch-kwargs", help="JSON keyword arguments for --arch."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="N,C,H,W to evaluate at (default: the model's recorded input shape, else the arch config)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per batch."),
    workers: int = typer.Option(4, "--workers", help="DataLoader worker processes."),
    json_path: Path | None = typer.Option(None, "--json", help="Write {top1, top5, samples} (fractions in [0, 1]) here."),
    min_top1: float | None = typer.Option(None, "--min-top1", help="Exit 3 when top-1 (a fraction) is below this budget; the JSON is still written."),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a checkpoint holding a pickled model (runs code from the file)."),
) -> None:
    """Top-1 / top-5 accuracy on an ImageFolder split, at the model's input size and eval transform."""
    from rich.table import Table

    from ..io.checks import parse_arch_kwargs, parse_input_shape
    from ..io.opening import open_model
    from ..evaluate import check_budget, evaluate_folder, resolve_device, validate_outputs
    from ..io.files import check_distinct_paths, write_json

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
