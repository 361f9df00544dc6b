"""``lrc eval``: top-1 / top-5 accuracy on an image folder, or agreement with the original on texts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import rich.markup
import typer

from ..errors import UsageError
from .app import app, out


@app.command("eval")
def eval_command(
    model: Path = typer.Argument(..., help="A compressed .lrc.safetensors, an original checkpoint with --arch, or a Hugging Face folder."),
    data: Path | None = typer.Option(None, "--data", help="Dataset root holding DIR/<split>/<class>/<image> (image classifiers)."),
    split: str = typer.Option("val", "--split", help="Which split folder to evaluate."),
    arch: str | None = typer.Option(None, "--arch", help="Architecture of an original checkpoint: torchvision:NAME, timm:NAME or package.module:callable."),
    arch_kwargs: str | None = typer.Option(None, "--arch-kwargs", help="JSON keyword arguments for --arch."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="N,C,H,W to evaluate at (default: the model's recorded input shape, else the arch config)."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per batch (texts: at most 32)."),
    workers: int = typer.Option(4, "--workers", help="DataLoader worker processes."),
    json_path: Path | None = typer.Option(None, "--json", help="Write {top1, top5, samples} (fractions in [0, 1]), or the text agreement figures, here."),
    min_top1: float | None = typer.Option(None, "--min-top1", help="Exit 3 when top-1 (a fraction) is below this budget; the JSON is still written."),
    device: str = typer.Option("auto", "--device", help="auto, cuda or cpu."),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="Allow a checkpoint holding a pickled model (runs code from the file)."),
    texts: Path | None = typer.Option(None, "--texts", help="Text models: a .txt (one sample per line) or .jsonl ('text' field) file to compare MODEL with --reference on."),
    reference: Path | None = typer.Option(None, "--reference", help="The original Hugging Face folder; its tokenizer reads --texts \\[default: MODEL when it is a folder]."),
    samples: int = typer.Option(1000, "--samples", help="At most this many --texts lines."),
    min_cosine: float | None = typer.Option(None, "--min-cosine", help="Encoders: exit 3 when the mean embedding cosine with the reference is below this."),
    min_agreement: float | None = typer.Option(None, "--min-agreement", help="Exit 3 below this nearest-neighbour agreement (encoders) or next-token top-1 agreement (language models)."),
    max_kl: float | None = typer.Option(None, "--max-kl", help="Language models: exit 3 when the mean next-token KL(reference ‖ model) in nats exceeds this."),
    max_perplexity_ratio: float | None = typer.Option(None, "--max-perplexity-ratio", help="Language models: exit 3 when perplexity / reference perplexity exceeds this."),
) -> None:
    """Top-1 / top-5 accuracy on an ImageFolder split; with --texts, agreement with the original text model."""
    if texts is not None:
        gates = {"min_cosine": min_cosine, "min_agreement": min_agreement, "max_kl": max_kl,
                 "max_perplexity_ratio": max_perplexity_ratio}
        return _eval_texts(model, texts, reference, samples, min(batch_size, 32), json_path, gates)
    if data is None:
        raise UsageError("pass --data (an image folder) or --texts (a text file, for Hugging Face text models)")
    _eval_images(model, data, split, arch, arch_kwargs, input_shape, batch_size, workers, json_path, min_top1,
                 device, trust_pickle)


def _eval_images(model: Path, data: Path, split: str, arch: str | None, arch_kwargs: str | None,
                 input_shape: str | None, batch_size: int, workers: int, json_path: Path | None,
                 min_top1: float | None, device: str, trust_pickle: bool) -> None:
    from rich.table import Table

    from ..evaluate import check_budget, evaluate_folder, resolve_device, validate_outputs
    from ..io.checks import parse_arch_kwargs, parse_input_shape
    from ..io.files import check_distinct_paths, write_json
    from ..io.opening import open_model

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


def _eval_texts(model: Path, texts: Path, reference: Path | None, samples: int, batch_size: int,
                json_path: Path | None, gates: dict[str, float | None]) -> None:
    from rich.table import Table

    from ..calibdata import read_texts
    from ..evaluate import validate_outputs
    from ..io.files import check_distinct_paths, write_json
    from ..io.opening import open_model
    from ..texteval import check_gates, gate_checks, text_agreement

    reference = reference or (model if model.is_dir() else None)
    if reference is None or not reference.is_dir():
        raise UsageError("--texts compares MODEL with the original: pass --reference DIR, its Hugging Face folder")
    check_distinct_paths({"MODEL": model, "--texts": texts}, {"--json": json_path})
    validate_outputs(json_path, None)
    if samples < 1:
        raise UsageError(f"--samples must be ≥ 1, got {samples}")
    original = open_model(reference)
    checks = gate_checks(original.hf.task, gates)
    candidate = original if model == reference else open_model(model)
    result = text_agreement(original.model, candidate.model, original.hf, read_texts(texts, samples), batch_size)
    table = Table(title=rich.markup.escape(f"{model.name} against {reference.name} on {texts.name}"))
    for key in result:
        table.add_column(key, justify="right")
    table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in result.values()))
    out.print(table)
    if json_path is not None:
        write_json(_rounded(result), json_path)
    check_gates(result, checks)


def _rounded(result: dict[str, Any]) -> dict[str, Any]:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in result.items()}
